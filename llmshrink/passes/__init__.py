"""Built-in passes: implementation llmshrink/passes/NAME.py (apply(model, cfg, ctx) -> record) and
settings llmshrink/passes/configs/NAME.py (@register_pass). This package imports nothing itself, so reading
a config never imports torch; llmshrink.registry imports an implementation when the pass runs."""
