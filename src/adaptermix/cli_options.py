"""The CLI's `key=value` options, read from the Hydra configs in `adaptermix.conf`: their defaults, their
meanings (the YAML files' inline comments), the check that refuses unknown keys with the closest valid one,
and the composed config. Nothing here imports torch.

    options("search", [])  -> {"search.k": Option("search.k", 5, "how many adapters to list"), ...}
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from importlib import resources

__all__ = ["Option", "UsageError", "options", "config_options", "router_names", "split_overrides", "check_overrides",
           "load_config", "own_config", "format_options"]

_ENTRY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(?:#\s*(?P<comment>.*))?$")
OVERRIDE = re.compile(r"^(?:\+{1,2}|~)?[A-Za-z_][\w.]*=")   # `key=value`, Hydra's `+key=`, `++key=`, `~key=`


class UsageError(Exception):
    """A misuse of the command line: exit code 2, one line naming the problem and the fix."""


@dataclass(frozen=True)
class Option:
    key: str
    default: object
    meaning: str


def _conf_text(*parts: str) -> str:
    return resources.files("adaptermix.conf").joinpath(*parts).read_text()


def _comments(text: str, prefix: str = "") -> dict[str, str]:
    """dotted key -> its inline comment, for one YAML file (nested by indentation)."""
    found, stack = {}, []
    for line in text.splitlines():
        match = _ENTRY.match(line)
        if not match or line.lstrip().startswith("-"):
            continue
        depth = len(match["indent"]) // 2
        stack = stack[:depth] + [match["key"]]
        if match["comment"]:
            found[prefix + ".".join(stack)] = match["comment"].strip()
    return found


def router_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("adaptermix.conf.router").iterdir()
                  if p.name.endswith(".yaml"))


def _router_summary(name: str) -> str:
    first = _conf_text("router", f"{name}.yaml").splitlines()[0]
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def load_config(overrides: list[str], config_name: str = "config"):
    """Compose `conf/<config_name>.yaml` with `key=value` overrides (Hydra's compose API). A copy: callers may
    change it."""
    from omegaconf import OmegaConf

    return OmegaConf.create(_composed(tuple(overrides), config_name))


@functools.lru_cache(maxsize=8)
def _composed(overrides: tuple[str, ...], config_name: str):
    """One Hydra composition per distinct override list in a process (each costs ~0.3 s)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="adaptermix.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


GROUPS = ("library", "router")   # conf/config.yaml's config groups: only Hydra composes them


def reads_groups(sections: tuple[str, ...]) -> bool:
    return any(section.split(".")[0] in GROUPS for section in sections)


def own_config(overrides: list[str]):
    """conf/config.yaml's own keys with `key=value` overrides, without Hydra (~0.3 s of imports and
    composition): for commands that read no config group (`verify`). Keys are checked before this."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(_conf_text("config.yaml"))
    cfg.pop("defaults", None)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def chosen_router(overrides: list[str]) -> str:
    choices = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "router"]
    return choices[-1] if choices else _default_router()


def _default_router() -> str:
    for line in _conf_text("config.yaml").splitlines():
        match = re.match(r"^\s*-\s*router:\s*(\w+)", line)
        if match:
            return match.group(1)
    return ""


def options(sections: tuple[str, ...], overrides: list[str]) -> dict[str, Option]:
    """Every key=value option under `sections` (prefixes of dotted keys; "router" adds the router group
    choice), with its default and meaning, for the router chosen in `overrides`."""
    if not sections:
        return {}
    if not reads_groups(sections):
        from omegaconf import OmegaConf

        meanings = _comments(_conf_text("config.yaml"))
        tree = _flatten(OmegaConf.to_container(own_config([]), resolve=False))
        return {key: Option(key, default, meanings.get(key, "")) for key, default in tree.items()
                if any(key == s or key.startswith(s + ".") for s in sections)}
    router = chosen_router(overrides)
    if router not in router_names():
        raise UsageError(f"unknown router {router!r}; choose one of {', '.join(router_names())} (router=NAME)")
    cfg = load_config([] if router == _default_router() else [f"router={router}"])
    meanings = {**_comments(_conf_text("config.yaml")),
                **_comments(_conf_text("library", "default.yaml"), "library."),
                **_comments(_conf_text("router", f"{router}.yaml"), "router.")}
    found = {}
    if "router" in sections:
        found["router"] = Option("router", router, f"the router: {', '.join(router_names())} "
                                                   f"({router}: {_router_summary(router)})")
    from omegaconf import OmegaConf

    for key, default in _flatten(OmegaConf.to_container(cfg, resolve=False)).items():
        if key.endswith("._target_") and key.startswith("router."):
            continue
        if any(key == s or key.startswith(s + ".") for s in sections):
            found[key] = Option(key, default, meanings.get(key, ""))
    return found


def config_options(config_name: str, cfg, router: str) -> dict[str, Option]:
    """Every key of a composed `conf/<config_name>.yaml` (a command with a config of its own, as `serve`), with
    its default and meaning, the router's keys those of conf/router/<router>.yaml."""
    from omegaconf import OmegaConf

    meanings = {**_comments(_conf_text(f"{config_name}.yaml")),
                **_comments(_conf_text("library", "default.yaml"), "library."),
                **_comments(_conf_text("router", f"{router}.yaml"), "router.")}
    found = {"router": Option("router", router, f"the router: {', '.join(router_names())}")}
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    for key, default in _flatten(tree).items():
        if not key.endswith("._target_"):
            found[key] = Option(key, default, meanings.get(key, ""))
    return found


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the key=value overrides); after `--` everything is an argument."""
    rest, overrides, literal = [], [], False
    for arg in argv:
        if arg == "--" and not literal:
            literal = True
            rest.append(arg)
        elif not literal and OVERRIDE.match(arg):
            overrides.append(arg)
        else:
            rest.append(arg)
    return rest, overrides


def _suggest(key: str, valid: list[str]) -> str:
    tails = [v for v in valid if v.endswith("." + key)]
    close = tails or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # compare last components: `serch.k` or `topk`
        by_tail = {v.rsplit(".", 1)[-1]: v for v in valid}
        close = [by_tail[t] for t in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_tail), n=1)]
    return f"; did you mean {close[0]}=...?" if close else ""


def check_overrides(command: str, overrides: list[str], valid: dict[str, Option]) -> list[str]:
    """The overrides in Hydra's spelling; UsageError for a key `command` does not read."""
    checked = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in valid:
            where = f"`adaptermix {command}`"
            if not valid:
                raise UsageError(f"{where} takes no key=value options, got {override!r}")
            raise UsageError(f"unknown option {key!r} for {where}{_suggest(key, list(valid))} "
                             f"(see adaptermix {command} --help)")
        checked.append(f"{key}={override.split('=', 1)[1]}")
    return checked


def format_options(valid: dict[str, Option]) -> str:
    """The --help block: one line per option, `key=default  meaning`."""
    if not valid:
        return ""
    width = min(max(len(f"{o.key}={_show(o.default)}") for o in valid.values()) + 2, 44)
    lines = ["key=value options (defaults from conf/; Hydra syntax):"]
    for option in valid.values():
        head = f"  {option.key}={_show(option.default)}"
        lines.append(f"{head:{width + 2}s}{option.meaning}" if len(head) <= width + 1 else f"{head}\n"
                     f"{'':{width + 2}s}{option.meaning}")
    return "\n".join(lines)


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value).replace(" ", "")
