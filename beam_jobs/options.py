"""Flags shared between the project's PipelineOptions classes.

Beam parses the flags of every PipelineOptions subclass imported in the process with one argparse parser, so
two jobs' classes cannot both add `--input` (argparse refuses the second). The downstream jobs import
`beam_jobs.embed_corpus` first (EmbedCorpusOptions is defined before them) and add a flag only when no earlier
class has: a shared flag (--input, --output, --batch_size, --overwrite...) must therefore keep the same type,
default and choices in every job, which `add_flag` checks.
"""

from __future__ import annotations

import argparse


def add_flag(group: argparse._ArgumentGroup, flag: str, **kwargs) -> None:
    """`group.add_argument(flag, **kwargs)`, unless an earlier options class already added the same flag."""
    existing = group._option_string_actions.get(flag)
    if existing is None:
        group.add_argument(flag, **kwargs)
        return
    for name in ("default", "type", "choices"):
        if name in kwargs and getattr(existing, name) != kwargs[name]:
            raise ValueError(f"{flag} is defined by two options classes with different {name}s: "
                             f"{getattr(existing, name)!r} and {kwargs[name]!r}")
