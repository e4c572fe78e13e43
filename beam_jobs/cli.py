"""`hubembed <command> ...`: one console script over the project's entry points.

    hubembed embed    ...   the embedding job (beam_jobs.embed_corpus)
    hubembed encoders bake  the pretrained default encoders (encoders.pretrained)
    hubembed train    ...   a classifier on the embeddings (beam_jobs.train_classifier)
    hubembed predict  ...   score embeddings with a trained classifier (beam_jobs.predict)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "embed": "beam_jobs.embed_corpus",
    "encoders": "encoders.pretrained",
    "train": "beam_jobs.train_classifier",
    "predict": "beam_jobs.predict",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # Import only the chosen entry point: each pulls in TensorFlow and Beam, which take seconds.
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
