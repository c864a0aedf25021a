"""Drop third-party log lines about a bitsandbytes kernel that llmshrink never runs.

On a CPU with AVX512-BF16, `import bitsandbytes` (0.50) tries to fetch a faster CPU 4-bit kernel from the
Hugging Face kernel hub (through the `kernels` package, which transformers installs) and, offline or
untrusted, logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." (and kernels logs
"Skipping publisher trust check ..."). That kernel serves only bitsandbytes' repacked bf16 path, which
llmshrink turns off on every 4-bit layer it makes or loads (llmshrink/bnb.py `_settle`), so the lines say
nothing a user can act on. Whoever imports bitsandbytes (llmshrink, peft, transformers), they are dropped
once llmshrink is imported; every other message of those loggers still shows.
"""

from __future__ import annotations

import logging
import warnings

# logger name -> start of the one message dropped
DROPPED = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
}


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Add the filters (once): cheap, imports neither bitsandbytes nor kernels."""
    for name, prefix in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefix))


def hide_library_deprecations() -> None:
    """Deprecation notices of torch, transformers and peft speak to the code that calls them (llmshrink's
    maintainers, who see them in the tests), not to someone running a command; `--debug` keeps them."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # torch 2.13 deprecates its quantized tensors, which int8-dynamic layers (fbgemm) still need
    warnings.filterwarnings("ignore", message=r"torch\.quantize_per_(tensor|channel)", category=UserWarning)
