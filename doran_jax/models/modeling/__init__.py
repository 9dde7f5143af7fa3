"""Our own Flax linen model families (no transformers Flax classes), loaded through hf_io."""
