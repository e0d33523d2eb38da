"""Benchmarks behind `codeloop bench`: each module has configure(parser) and main(args)."""
