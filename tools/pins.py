"""The versions every fixture and golden script is pinned to (tools/requirements.txt), checked
before the pinned libraries are used: a golden file made with other versions would test
nothing."""

PINS = {
    "torch": "2.9.1",
    "transformers": "4.57.6",
    "Pillow": "13.0.0",
    "safetensors": "0.8.0",
    "tokenizers": "0.22.2",
    "numpy": "2.4.6",
}


def check_versions():
    """The installed versions, as a dict; fails unless each is the pinned one."""
    import numpy
    import PIL
    import safetensors
    import tokenizers
    import torch
    import transformers

    found = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "Pillow": PIL.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
    }
    bad = {k: (found[k], v) for k, v in PINS.items() if found[k] != v}
    assert not bad, f"version mismatch (found, pinned): {bad}; install tools/requirements.txt"
    return found
