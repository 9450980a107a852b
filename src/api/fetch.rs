//! Image URLs, fetched safely. Off unless `image_url_allowed_hosts` names hosts; then:
//! - one parser (the `url` crate, WHATWG rules) reads the URL, and what is fetched is rebuilt
//!   from what it read, so the check and the fetch cannot disagree (vLLM's CVE-2026-24779 was
//!   two parsers reading a backslash differently);
//! - http and https only, no user info, the host on the allow list (exact names, `*.suffix`,
//!   or `*`);
//! - the name is resolved once, by our resolver inside the client, and only the addresses that
//!   passed the check are connected to (no DNS-rebinding window); loopback, private,
//!   link-local, CGNAT, multicast, unspecified, documentation and reserved addresses are
//!   refused unless `image_url_allow_private`; no proxy is used;
//! - redirects are followed only up to `image_url_max_redirects`, each hop checked again;
//! - the body is capped at `max_image_bytes` while it streams, and `image_url_timeout_s`
//!   bounds the whole fetch.
//!
//! May use: `ApiError`. May not touch: the engine or the model.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::error::ApiError;

/// What the server may fetch (config keys `image_url_*`).
#[derive(Debug, Clone, Default)]
pub struct UrlPolicy {
    /// Exact host names, `*.suffix` patterns, or `*`; empty: no URL is fetched.
    pub allowed_hosts: Vec<String>,
    pub allow_private: bool,
    pub max_redirects: u32,
    pub timeout: Duration,
    pub max_bytes: usize,
}

/// Names to addresses; the system resolver, or a test's.
pub type Resolve = Arc<dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync>;

pub fn system_resolver() -> Resolve {
    Arc::new(|host: &str, port: u16| Ok((host, port).to_socket_addrs()?.collect()))
}

fn refused(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_image_url", message)
}

/// Addresses no public image lives at.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let v4 = Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32);
                return is_private_v4(v4);
            }
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard
                || s[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible (deprecated)
        }
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0 // this network, incl. 0.0.0.0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b)) // CGNAT
        || (a == 169 && b == 254) // link-local
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && (c == 0 || c == 2)) // IETF, TEST-NET-1
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || (a == 198 && b == 51 && c == 100) // TEST-NET-2
        || (a == 203 && b == 0 && c == 113) // TEST-NET-3
        || a >= 224 // multicast, reserved, broadcast
}

fn host_allowed(patterns: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    patterns.iter().any(|p| {
        let p = p.trim_end_matches('.').to_ascii_lowercase();
        p == "*"
            || p == host
            || p.strip_prefix("*.")
                .is_some_and(|suffix| host.ends_with(&format!(".{suffix}")))
    })
}

/// One hop's URL, checked: the canonical text to fetch, its host and port.
#[derive(Debug)]
struct Checked {
    url: url::Url,
    host: String,
    port: u16,
}

fn check_url(policy: &UrlPolicy, url: &url::Url) -> Result<Checked, ApiError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refused(format!(
            "image URL scheme {:?} is not fetched: use http or https (or a data: URL)",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refused("image URLs with user info (user@host) are refused"));
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(refused("the image URL has no host")),
    };
    if !host_allowed(&policy.allowed_hosts, &host) {
        return Err(refused(format!(
            "host {host:?} is not in image_url_allowed_hosts"
        )));
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    };
    if let Some(ip) = ip {
        if !policy.allow_private && is_private(ip) {
            return Err(refused(format!(
                "{ip} is not a public address (image_url_allow_private is off)"
            )));
        }
    }
    let port = url
        .port_or_known_default()
        .ok_or_else(|| refused("the image URL has no port"))?;
    Ok(Checked {
        url: url.clone(),
        host,
        port,
    })
}

/// The addresses a checked host may be connected to: resolved once here; refused when none
/// is public (unless private ones are allowed).
fn addresses(
    policy: &UrlPolicy,
    resolve: &Resolve,
    c: &Checked,
) -> Result<Vec<SocketAddr>, ApiError> {
    let all = match c.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, c.port)],
        Err(_) => resolve(&c.host, c.port)
            .map_err(|e| refused(format!("could not resolve {:?}: {e}", c.host)))?,
    };
    let usable: Vec<SocketAddr> = all
        .iter()
        .copied()
        .filter(|a| policy.allow_private || !is_private(a.ip()))
        .collect();
    if usable.is_empty() {
        return Err(refused(format!(
            "{:?} resolves to no public address (image_url_allow_private is off)",
            c.host
        )));
    }
    Ok(usable)
}

/// Hands ureq exactly the addresses that were checked for this hop.
#[derive(Debug)]
struct Pinned(Vec<SocketAddr>);

impl ureq::unversioned::resolver::Resolver for Pinned {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let mut out = self.empty();
        for a in self.0.iter().take(16) {
            out.push(*a);
        }
        Ok(out)
    }
}

/// GETs `url` under `policy` (blocking: call it off the async runtime).
pub fn fetch_blocking(
    policy: &UrlPolicy,
    resolve: &Resolve,
    url: &str,
) -> Result<Vec<u8>, ApiError> {
    if policy.allowed_hosts.is_empty() {
        return Err(refused(
            "image URLs are not fetched by this server (image_url_allowed_hosts is empty): send the image itself, base64 or as a data: URL",
        ));
    }
    let deadline = Instant::now() + policy.timeout;
    let mut current =
        url::Url::parse(url).map_err(|e| refused(format!("invalid image URL: {e}")))?;
    for hop in 0..=policy.max_redirects {
        let checked = check_url(policy, &current)?;
        let addrs = addresses(policy, resolve, &checked)?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        let config = ureq::Agent::config_builder()
            .proxy(None)
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_global(Some(left))
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::default(),
            Pinned(addrs),
        );
        let response = agent
            .get(checked.url.as_str())
            .call()
            .map_err(|e| fetch_error(&e))?;
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            let location = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    refused(format!(
                        "the image URL answered {status} without a Location"
                    ))
                })?;
            if hop == policy.max_redirects {
                return Err(refused(format!(
                    "the image URL redirects ({status}); image_url_max_redirects is {}",
                    policy.max_redirects
                )));
            }
            current = current
                .join(location)
                .map_err(|e| refused(format!("bad redirect location: {e}")))?;
            continue;
        }
        if status != 200 {
            return Err(refused(format!("the image URL answered {status}")));
        }
        let mut body = response.into_body();
        return body
            .with_config()
            .limit(policy.max_bytes as u64)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "image_too_large",
                    format!(
                        "the image at the URL is larger than {} bytes (max_image_bytes)",
                        policy.max_bytes
                    ),
                ),
                other => fetch_error(&other),
            });
    }
    Err(refused("too many redirects"))
}

fn timed_out() -> ApiError {
    refused("fetching the image URL took longer than image_url_timeout_s")
}

fn fetch_error(e: &ureq::Error) -> ApiError {
    match e {
        ureq::Error::Timeout(_) => timed_out(),
        other => refused(format!("could not fetch the image URL: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &[&str]) -> UrlPolicy {
        UrlPolicy {
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            allow_private: false,
            max_redirects: 0,
            timeout: Duration::from_secs(2),
            max_bytes: 1 << 20,
        }
    }

    fn never() -> Resolve {
        Arc::new(|host: &str, _| panic!("{host} must not be resolved"))
    }

    #[test]
    fn private_and_odd_forms_of_loopback_are_refused_before_any_lookup() {
        let p = policy(&["*"]);
        for url in [
            "http://127.0.0.1/a.png",
            "http://2130706433/a.png", // decimal
            "http://0177.0.0.1/a.png", // octal
            "http://0x7f.1/a.png",     // hex, short form
            "http://[::1]/a.png",
            "http://[::ffff:127.0.0.1]/a.png", // IPv4-mapped
            "http://[::ffff:7f00:1]/a.png",
            "http://0.0.0.0/a.png",
            "http://169.254.169.254/latest/meta-data",
            "http://100.64.0.1/",
            "http://10.1.2.3/",
            "http://192.168.1.1/",
            "http://[fe80::1]/",
            "http://[fc00::1]/",
            "http://224.0.0.1/",
            "http://240.0.0.1/",
            "http://[64:ff9b::7f00:1]/",
        ] {
            let e = fetch_blocking(&p, &never(), url)
                .err()
                .unwrap_or_else(|| panic!("{url} fetched"));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{url}");
            assert!(
                e.message.contains("not a public address"),
                "{url}: {}",
                e.message
            );
        }
    }

    #[test]
    fn hosts_user_info_schemes_and_backslashes_are_read_by_one_parser() {
        // The allow list is checked on the host the fetch would use.
        let p = policy(&["images.example.com"]);
        for (url, why) in [
            ("http://evil.com/a.png", "not in image_url_allowed_hosts"),
            ("http://images.example.com@127.0.0.1/a.png", "user info"),
            ("http://user@images.example.com/a.png", "user info"),
            // WHATWG: a backslash is a path separator in http URLs, so the host is 127.0.0.1.
            (
                "http://127.0.0.1\\@images.example.com/a.png",
                "not in image_url_allowed_hosts",
            ),
            ("file:///etc/passwd", "scheme"),
            ("ftp://images.example.com/a.png", "scheme"),
            ("gopher://images.example.com/", "scheme"),
        ] {
            let e = fetch_blocking(&p, &never(), url)
                .err()
                .unwrap_or_else(|| panic!("{url} fetched"));
            assert!(e.message.contains(why), "{url}: {}", e.message);
        }
        // localhost. (trailing dot) is a name; it resolves to loopback and is refused.
        let p = policy(&["localhost"]);
        let loopback: Resolve =
            Arc::new(|_, port| Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]));
        let e = fetch_blocking(&p, &loopback, "http://localhost./a.png").unwrap_err();
        assert!(e.message.contains("no public address"), "{}", e.message);
    }

    #[test]
    fn a_name_is_resolved_once_and_private_answers_are_dropped() {
        // A resolver that answers public, then private (rebinding): it is asked once per hop,
        // and only the checked answer would be connected to.
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        let rebinding: Resolve = Arc::new(move |_, port| {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let ip = if n == 0 {
                [203, 0, 114, 1]
            } else {
                [127, 0, 0, 1]
            };
            Ok(vec![SocketAddr::from((ip, port))])
        });
        let p = policy(&["*"]);
        let c = check_url(&p, &url::Url::parse("http://rebind.example/a.png").unwrap()).unwrap();
        let addrs = addresses(&p, &rebinding, &c).unwrap();
        assert_eq!(addrs, [SocketAddr::from(([203, 0, 114, 1], 80))]);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Mixed answers keep only the public ones; all private is refused.
        let mixed: Resolve = Arc::new(|_, port| {
            Ok(vec![
                SocketAddr::from(([10, 0, 0, 1], port)),
                SocketAddr::from(([8, 8, 8, 8], port)),
            ])
        });
        assert_eq!(
            addresses(&p, &mixed, &c).unwrap(),
            [SocketAddr::from(([8, 8, 8, 8], 80))]
        );
    }

    #[test]
    fn nothing_is_fetched_without_an_allow_list() {
        let e = fetch_blocking(&policy(&[]), &never(), "https://example.com/a.png").unwrap_err();
        assert!(
            e.message.contains("image_url_allowed_hosts is empty"),
            "{}",
            e.message
        );
    }

    #[test]
    fn suffix_patterns_match_subdomains_only() {
        let pats = vec!["*.example.com".to_string()];
        assert!(host_allowed(&pats, "cdn.example.com"));
        assert!(host_allowed(&pats, "a.b.example.com."));
        assert!(!host_allowed(&pats, "example.com"));
        assert!(!host_allowed(&pats, "badexample.com"));
    }
}
