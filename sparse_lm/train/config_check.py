"""Clear errors for command-line config overrides before absl parses them.

`ml_collections.config_flags` reports an unknown `--config.train.no_such_key=1` as a bare
`AttributeError: 'no_such_key'`. `check_overrides(argv)` loads the config file named by
`--config=` the same way and names the unknown key, where it is, and the keys that exist there.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


class ConfigOverrideError(SystemExit):
    pass


def _load(path: str):
    spec = importlib.util.spec_from_file_location("_config_for_check", path)
    if spec is None or spec.loader is None:
        raise ConfigOverrideError(f"error: --config={path}: not a Python config file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def check_overrides(argv: list[str], default_config: str | None = None, flag: str = "config") -> None:
    """Raise ConfigOverrideError (exit status 2, one clear line) for an override of a key that the
    config does not have. Does nothing when no config file can be determined."""
    path = default_config
    overrides = []
    for a in argv[1:]:
        if a.startswith(f"--{flag}="):
            path = a.split("=", 1)[1]
        elif a.startswith(f"--{flag}."):
            overrides.append(a[len(flag) + 3:].split("=", 1)[0])
    if not overrides or not path or not Path(path.split(":")[0]).exists():
        return
    cfg = _load(path.split(":")[0])
    for key in overrides:
        node, walked = cfg, []
        for part in key.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(walked) or "the top level"
                raise ConfigOverrideError(
                    f"error: --{flag}.{key}: the config {path} has no key {part!r} under "
                    f"{where}; keys there: {sorted(keys)}")
            node = node[part]
            walked.append(part)


def main_guard(argv=None, default_config: str | None = None) -> None:
    """Call at the top of a launcher's `__main__` block."""
    try:
        check_overrides(sys.argv if argv is None else argv, default_config)
    except ConfigOverrideError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2)
