"""Assemble study -> job: decide when a received study is complete."""
