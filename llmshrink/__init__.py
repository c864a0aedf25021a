"""llmshrink: make small language models smaller and faster, and prove it with numbers."""

from llmshrink import quiet as _quiet
from llmshrink.version import __version__ as __version__  # re-exported: llmshrink.__version__

_quiet.install()  # before anything imports bitsandbytes: see llmshrink/quiet.py


def load(path, device="cpu"):
    """Rebuild a compressed checkpoint from its manifest and load its weights strictly."""
    from llmshrink.checkpoint_load import load_checkpoint

    return load_checkpoint(path, device=device)
