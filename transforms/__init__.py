"""Reusable PTransforms and DoFns: read, prepare, embed, write, dead letters, progress and report."""
