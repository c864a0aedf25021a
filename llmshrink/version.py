"""llmshrink's version, in a module of its own so that checkpoint code can record it without importing the
package's `__init__` (whose `llmshrink.load` imports checkpoint_load)."""

__version__ = "0.1.0"
