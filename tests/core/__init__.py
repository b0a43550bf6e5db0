"""Tests of the core package `mmreduce`: engine, methods, invariants, FLOPs, schedules, SPEC parser, CLI."""
