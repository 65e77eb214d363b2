"""Tests of the GRPO harness (megatron_sed.rl)."""
