"""Configs for every CLI: the command line before Hydra parses it (values quoted where Hydra's grammar would
refuse them; a bad key or value reported in one line that says what was meant) and building the parts of a
composed config with a one-line error naming the part.

    sora-train trainer.max_step=50      -> sora-train: error in the config: no key trainer.max_step;
                                           did you mean trainer.max_steps? (a new key: +trainer.max_step=50)
    sora-train experiment=quickstart/dti -> ... no experiment 'quickstart/dti'; the experiments:
                                           quickstart/audio_vae, quickstart/dit, quickstart/video_vae
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")  # package data: a checkout or an installed wheel


def quote_values(args: list[str]) -> list[str]:
    """``key=value`` arguments whose value Hydra's grammar would refuse unquoted, single-quoted: a path
    with ``=`` (``ckpt=run/checkpoints/step=4000.ckpt``, as the run names its checkpoints) and text
    with a comma (``prompt=two balls, a blue one``: else an ambiguous sweep; not under ``--multirun``).
    Values that already hold quotes, brackets, braces, parentheses (sweeps: ``choice(1e-3, 3e-3)``)
    or interpolations are Hydra syntax and stay as typed."""
    sweep = any(a in ("-m", "--multirun") for a in args)  # there a comma separates the sweep's values
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if (eq and not arg.startswith("-") and ("=" in value or ("," in value and not sweep))
                and not any(c in value for c in "'\"[]{}()$\\")):
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def fail(what: str, error: BaseException, prog: str = "sora-train") -> SystemExit:
    """One line on stderr naming the config part (and the key, in the message) that is wrong."""
    from hydra.errors import InstantiationException

    cause = error
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    text = " ".join(str(cause).split()) or type(cause).__name__
    return SystemExit(f"{prog}: error in {what}: {type(cause).__name__}: {text}")


def build(cfg, what: str, prog: str = "sora-train", **kwargs):
    """``instantiate(cfg, **kwargs)``; any construction error becomes one line naming the part (``what``)."""
    from hydra.utils import instantiate

    try:
        return instantiate(cfg, **kwargs)
    except Exception as e:  # noqa: BLE001 - any construction error becomes one line naming the part
        raise fail(what, e, prog) from e


def named(cfg, what: str) -> list:
    """A dict of named ``_target_`` configs (callbacks, loggers) -> built objects; null entries skipped."""
    return [build(c, f"{what}.{name}") for name, c in (cfg or {}).items() if c is not None and "_target_" in c]


def config_keys(cfg, prefix: str = "") -> list[str]:
    """Every key of a composed config as a dotted path (``trainer.max_steps``), interpolations unresolved."""
    from omegaconf import DictConfig

    keys = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            keys += config_keys(node, path + ".")
    return keys


def group_options(configs: str, group: str) -> list[str]:
    """The options of a config group (``experiment`` -> ``quickstart/dit``, ...): its yaml files."""
    root = Path(configs) / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def help_groups(*groups: str, configs: str = CONFIGS) -> str:
    """``group: option, ...`` lines for a command's ``--help`` (resolver ``sora_groups``): only the groups
    that command composes (Hydra's own list shows every folder of the shared config root)."""
    return "\n".join(f"{g}: {', '.join(group_options(configs, g))}" for g in groups)


def explain(message: str, args: list[str], config: str, configs: str) -> str:
    """Hydra's message for a failed composition, with what was probably meant: the closest existing keys
    for an unknown key, the options of a group for an unknown option; else the message itself."""
    from hydra import compose

    unknown = re.search(r"Could not override '([^']+)'", message)
    if unknown:
        key = unknown.group(1)
        given = next((a for a in args if a.partition("=")[0] == key), key)
        try:  # the config without the bad key, to list what exists
            cfg = compose(config, overrides=[a for a in args if a.partition("=")[0] != key])
        except Exception:  # noqa: BLE001 - another bad override too: the plain config
            cfg = compose(config)
        keys = config_keys(cfg)
        parent, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
        close = [f"{parent}.{k}" if parent else k for k in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.75)]
        close = close or difflib.get_close_matches(key, keys, n=2, cutoff=0.75)  # under another parent
        hint = f"did you mean {' or '.join(close)}?" if close else "no existing key is close to it"
        return f"no key {key}; {hint} (a new key: +{given})"
    missing = re.search(r"Could not find '([^']+)'", message)
    if missing:
        path = missing.group(1)
        for arg in args:
            group, _, option = arg.lstrip("+~").partition("=")
            if f"{group.replace('.', '/')}/{option}" == path and (Path(configs) / group).is_dir():
                options = group_options(configs, group)
                close = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}? " if close else ""
                return f"no {group} '{option}'; {hint}the {group} options: {', '.join(options)}"
    return message


def register_help_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sora_groups"):
        OmegaConf.register_new_resolver("sora_groups", help_groups)


def check_overrides(args: list[str], config: str = "train", prog: str = "sora-train",
                    configs: str = CONFIGS) -> list[str]:
    """Before Hydra's main: quote the values that need it (:func:`quote_values`), then compose the config
    once so that a bad key or value is one line. Returns the quoted arguments (for ``sys.argv``)."""
    args = quote_values(args)
    register_help_resolver()
    if any(a.startswith("-") for a in args):  # Hydra's own flags (--multirun, --cfg, ...): Hydra reports
        return args
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(configs, version_base="1.3"):
        try:
            compose(config, overrides=list(args))
        except (HydraException, OmegaConfBaseException) as e:
            text = str(e) or str(e.__cause__ or "") or type(e).__name__
            lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith(
                ("full_key:", "object_type=", "reference_type="))]
            raise SystemExit(f"{prog}: error in the config: " + explain(" ".join(lines), args, config, configs)) \
                from None
    return args
