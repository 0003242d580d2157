"""Studies whose measured tables go into the README and docs/ (each: python -m fedllm.studies.<name>)."""
