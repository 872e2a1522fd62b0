"""Print a deploy file with its ${SOFTPRUNE_*} placeholders filled in from the environment.

    python deploy/render.py deploy/ray-cluster.yaml > .cache/ray-cluster.yaml
    python deploy/render.py deploy/rayjob.yaml | kubectl apply -f -

Only `${SOFTPRUNE_NAME}` is replaced, so shell variables in the files' commands stay as they are;
a placeholder whose variable is unset or empty stops it with one line naming the variables (unlike
envsubst, which would leave an empty image or bucket behind). Standard library only: it runs in
any Python 3, not just the project's environment.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

PLACEHOLDER = re.compile(r"\$\{(SOFTPRUNE_[A-Z0-9_]+)\}")


def placeholders(text: str) -> list[str]:
    """The variable names a file asks for, in order of first use."""
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def render(text: str, env: Mapping[str, str]) -> str:
    """`text` with every placeholder replaced; ValueError naming the variables that are not set."""
    missing = [name for name in placeholders(text) if not env.get(name)]
    if missing:
        raise ValueError(f"set {', '.join(missing)} first (README.md, 'Running on a cloud')")
    return PLACEHOLDER.sub(lambda m: env[m.group(1)], text)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python deploy/render.py deploy/FILE.yaml", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        sys.stdout.write(render(path.read_text(), os.environ))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"render.py: {path}: {reason}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
