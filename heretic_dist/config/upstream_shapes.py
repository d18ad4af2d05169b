"""Upstream Heretic configs of each shape (1.4.0, master, 2.x) translated to ours; key tables: upstream.py.

`translate_upstream` is pure: from the raw TOML dict it returns our dict, the translations it made and
the upstream keys that have no equivalent here. `from_upstream` is the hook load.py calls before checking
keys: one notice line (INFO) naming the shape and the translations, one warning line naming the keys
with no equivalent. A modifier other than Abliteration, an unknown key in a plugin table, and one setting
given in both its old and its new place are each one UserError line.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from heretic_dist.errors import UserError

from .prompt_sets import PromptSetSpec
from .schema import PROMPT_SET_KEYS
from .upstream import (
    ABLITERATION,
    ABLITERATION_KEYS,
    DEFAULT_SCORERS,
    IGNORED_PROMPT_SET_KEYS,
    IGNORED_UPSTREAM_KEYS,
    LATER_UPSTREAM_KEYS,
    MODIFIER_ENTRY_KEYS,
    PLOT_KEY_REASON,
    PLUGIN_KEY_REASONS,
    RAW_OBJECTIVES,
    RAW_OBJECTIVES_NOTE,
    SCORER_CLASSES,
    SCORER_ENTRY_KEYS,
    SCORER_KEYS,
    log,
)

SHAPE_1_4_0, SHAPE_MASTER, SHAPE_2X = "1.4.0", "master", "2.x"
OPTIMIZATIONS = ("minimize", "maximize", "none")


@dataclass
class Translation:
    """What `translate_upstream` made of a config."""

    shape: str | None  # SHAPE_*; None: nothing upstream-only in it (a heretic-dist config)
    data: dict[str, Any]  # in our shape
    translated: list[str] = field(default_factory=list)  # "upstream key -> our key" notes, in order
    no_equivalent: list[tuple[str, str]] = field(default_factory=list)  # (upstream key, why), dropped


def detect_shape(data: Mapping[str, Any]) -> str | None:
    """2.x has modifier plugins, master scorer plugins or headless keys, 1.4.0 only its flat keys."""
    if "modifiers" in data or "modifier" in data:
        return SHAPE_2X
    if "scorers" in data or "scorer" in data or any(key in data for key in LATER_UPSTREAM_KEYS):
        return SHAPE_MASTER
    plot_keys = any(isinstance(data.get(k), dict) and any(p in data[k] for p in IGNORED_PROMPT_SET_KEYS)
                    for k in PROMPT_SET_KEYS)
    if plot_keys or any(key in data for key in IGNORED_UPSTREAM_KEYS):
        return SHAPE_1_4_0
    return None


def translate_upstream(raw: Mapping[str, Any], source: str) -> Translation:
    """`raw` (not changed) in our shape. A 1.4.0 config is left as it is: its keys have our names, and
    load.py drops the ones it ignores with a warning each, as before."""
    t = Translation(detect_shape(raw), copy.deepcopy(dict(raw)))
    if t.shape in (SHAPE_MASTER, SHAPE_2X):
        _drop_top_level(t)
        if t.shape == SHAPE_2X:
            _modifiers(t, source)
        _scorers(t, source)
        _raw_objectives(t)
    return t


def from_upstream(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The hook of load.py: `data` in our shape, with the notice and the warning logged."""
    t = translate_upstream(data, source)
    if t.shape is None:
        return t.data
    done = ", ".join(t.translated) if t.translated else "nothing (its keys have the same names here)"
    log.info("upstream Heretic %s config in %s: translated %s", t.shape, source, done)
    if t.no_equivalent:
        log.warning("upstream Heretic %s config in %s: no equivalent here, ignored: %s",
                    t.shape, source, _grouped(t.no_equivalent))
    return t.data


# ----------------------------------------------------------------------------------------------------
# Parts of the translation


def _drop_top_level(t: Translation) -> None:
    """Top-level keys with no equivalent (headless answers, export and plot options)."""
    for key in list(t.data):
        why = LATER_UPSTREAM_KEYS.get(key) or IGNORED_UPSTREAM_KEYS.get(key)
        if why:
            del t.data[key]
            t.no_equivalent.append((key, why))
    for key in PROMPT_SET_KEYS:
        if isinstance(t.data.get(key), dict):
            _drop_plot_keys(t, t.data[key], key)


def _modifiers(t: Translation, source: str) -> None:
    """2.x: `modifiers` must select Abliteration alone; [modifier.Abliteration] keys move to the top."""
    listed = t.data.pop("modifiers", None)
    tables = _plugin_tables(t, "modifier", source)
    entries = _entries([{"plugin": ABLITERATION}] if listed is None else listed, "modifiers",
                       MODIFIER_ENTRY_KEYS, source)
    for entry in entries:
        if entry["plugin"] != ABLITERATION:
            raise UserError(f"modifier plugin '{entry['plugin']}' in {source} is not supported: heretic-dist "
                            f"implements only Abliteration ({ABLITERATION})")
    if len(entries) != 1:
        raise UserError(f"'modifiers' in {source} lists {len(entries)} modifiers: give exactly one, "
                        f"{{ plugin = \"{ABLITERATION}\" }}")
    if listed is not None:
        t.translated.append("modifiers = [Abliteration] -> heretic-dist's abliteration")
    moved: dict[str, list[str]] = {}  # upstream table -> its keys, each now the top-level key of its name
    for key, (value, name) in _merged(tables, "modifier", "Abliteration", entries[0].get("instance_name")).items():
        if key not in ABLITERATION_KEYS:
            raise UserError(f"unknown key '{name}' in {source}{_suggest(key, ABLITERATION_KEYS, _parent(name))}")
        if key in ("good_prompts", "bad_prompts"):
            value = _prompt_table(t, value, name, source)
        _put(t, key, value, name, source, note=False)
        moved.setdefault(_parent(name)[:-1], []).append(key)
    t.translated.extend(f"{table}.{{{', '.join(keys)}}} -> the top-level keys of the same names"
                        for table, keys in moved.items())
    for name in tables:
        t.no_equivalent.append((f"[modifier.{name}]", "only Abliteration is implemented"))


def _scorers(t: Translation, source: str) -> None:
    """master and 2.x: KeywordRate and KLDivergence are our two objectives; their tables move to ours."""
    listed = t.data.pop("scorers", None)
    tables = _plugin_tables(t, "scorer", source)
    entries = _entries(copy.deepcopy(DEFAULT_SCORERS) if listed is None else listed, "scorers",
                       SCORER_ENTRY_KEYS, source)
    seen: list[str] = []
    for number, entry in enumerate(entries, 1):
        if entry.get("optimization") not in OPTIMIZATIONS:
            raise UserError(f"scorers entry {number} in {source}: `optimization` must be "
                            f"\"minimize\", \"maximize\" or \"none\"")
        cls = SCORER_CLASSES.get(entry["plugin"])
        if cls is None:
            _unknown_scorer(t, tables, entry)
            continue
        if cls in seen:
            t.no_equivalent.append((f"scorers: a second {cls}", "one instance of each scorer here"))
            continue
        seen.append(cls)
        if entry["optimization"] != "minimize":
            t.no_equivalent.append((f"scorers: {cls} optimization = \"{entry['optimization']}\"",
                                    "both objectives are minimized here"))
        for key, (value, name) in _merged(tables, "scorer", cls, entry.get("instance_name")).items():
            _scorer_key(t, cls, key, value, name, source)
    if listed is not None and seen:
        t.translated.append(f"scorers ({', '.join(seen)}) -> the refusal and KL objectives")
    for cls in SCORER_KEYS:
        if cls not in seen:
            t.no_equivalent.append((f"scorers without {cls}", "heretic-dist always minimizes refusals and KL"))
    for name in tables:
        t.no_equivalent.append((f"[scorer.{name}]", "no such scorer in `scorers`"))


def _unknown_scorer(t: Translation, tables: dict[str, dict[str, Any]], entry: dict[str, Any]) -> None:
    """A scorer we do not have: it and its tables are named in the warning."""
    why = "heretic-dist scores refusals and KL only"
    t.no_equivalent.append((f"scorers: {entry['plugin']}", why))
    cls = re.split(r"[.:]", entry["plugin"])[-1]
    for name in (cls, f"{cls}_{entry.get('instance_name')}"):
        if tables.pop(name, None) is not None:
            t.no_equivalent.append((f"[scorer.{name}]", why))


def _scorer_key(t: Translation, cls: str, key: str, value: Any, name: str, source: str) -> None:
    keys = SCORER_KEYS[cls]
    if key not in keys:
        raise UserError(f"unknown key '{name}' in {source}{_suggest(key, keys, _parent(name))}")
    ours = keys[key]
    if ours is None:
        t.no_equivalent.append((name, PLUGIN_KEY_REASONS[key]))
        return
    if key == "prompts":
        value = _prompt_table(t, value, name, source)
    _put(t, ours, value, name, source)


def _raw_objectives(t: Translation) -> None:
    """Upstream after 1.4.0 has no kl_divergence_scale/target: its objectives are raw rates."""
    given = [key for key in RAW_OBJECTIVES if key in t.data]
    for key, value in RAW_OBJECTIVES.items():
        t.data.setdefault(key, value)
    if not given:
        t.translated.append(f"raw-rate objectives -> {RAW_OBJECTIVES_NOTE}")
    else:
        t.translated.append(f"{', '.join(given)} kept as written (upstream {t.shape} has no such keys; "
                            f"its raw-rate objectives would be kl_divergence_scale = 1, kl_divergence_target = 0)")


# ----------------------------------------------------------------------------------------------------
# Helpers


def _plugin_tables(t: Translation, kind: str, source: str) -> dict[str, dict[str, Any]]:
    """`[scorer]` or `[modifier]`: plugin name -> its table, with dotted keys made tables."""
    tables = t.data.pop(kind, {})
    if not isinstance(tables, dict):
        raise UserError(f"'{kind}' in {source} must be a table of plugin tables ([{kind}.<ClassName>])")
    tables = _nested(tables)
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise UserError(f"'{kind}.{name}' in {source} must be a table ([{kind}.{name}] with its keys)")
    return tables


def _entries(entries: Any, key: str, allowed: Iterable[str], source: str) -> list[dict[str, Any]]:
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"'{key}' in {source} must be a list of tables like {{ plugin = \"...\" }}")
    for number, entry in enumerate(entries, 1):
        for sub in entry:
            if sub not in allowed:
                raise UserError(f"unknown key '{sub}' in {key} entry {number} in {source}{_suggest(sub, allowed)}")
        if not isinstance(entry.get("plugin"), str):
            raise UserError(f"{key} entry {number} in {source} needs `plugin` (a string)")
    return entries


def _merged(tables: dict[str, dict[str, Any]], kind: str, cls: str, instance: str | None
            ) -> dict[str, tuple[Any, str]]:
    """key -> (value, upstream name) of [kind.cls] with [kind.cls_instance] over it (upstream's rule);
    both tables are taken out of `tables`."""
    base = tables.pop(cls, {})
    over = tables.pop(f"{cls}_{instance}", {}) if instance else {}
    out: dict[str, tuple[Any, str]] = {}
    for key in {**base, **over}:
        if key not in over:
            out[key] = (base[key], f"{kind}.{cls}.{key}")
            continue
        value = over[key]
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            value = {**base[key], **value}
        out[key] = (value, f"{kind}.{cls}_{instance}.{key}")
    return out


def _prompt_table(t: Translation, value: Any, name: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"'{name}' in {source} must be one table of dataset keys ([{name}] with dataset, "
                        f"split, column, ...)")
    valid = [f for f in PromptSetSpec.model_fields if f not in IGNORED_PROMPT_SET_KEYS]
    for sub in value:
        if sub not in valid and sub not in IGNORED_PROMPT_SET_KEYS:
            raise UserError(f"unknown key '{name}.{sub}' in {source}{_suggest(sub, valid, name + '.')}")
    _drop_plot_keys(t, value, name)
    return value


def _drop_plot_keys(t: Translation, table: dict[str, Any], name: str) -> None:
    for sub in IGNORED_PROMPT_SET_KEYS:
        if sub in table:
            del table[sub]
            t.no_equivalent.append((f"{name}.{sub}", PLOT_KEY_REASON))


def _put(t: Translation, ours: str, value: Any, name: str, source: str, note: bool = True) -> None:
    if ours in t.data and t.data[ours] != value:
        raise UserError(f"'{ours}' and '{name}' in {source} are the same setting with different values: "
                        f"keep one of them")
    t.data[ours] = value
    if note:
        t.translated.append(f"{name} -> {ours}")


def _nested(table: dict[str, Any]) -> dict[str, Any]:
    """Quoted dotted keys ("KeywordRate.prompts" = {...}) as the tables they name, at every depth."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            value = _nested(value)
        *parents, last = key.split(".")
        here = out
        for part in parents:
            here = here.setdefault(part, {})
            if not isinstance(here, dict):
                break
        else:
            if isinstance(value, dict) and isinstance(here.get(last), dict):
                here[last] = {**here[last], **value}
            else:
                here[last] = value
            continue
        out[key] = value  # a dotted key under a non-table: keep it for the error it will get
    return out


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] + "."


def _suggest(key: str, valid: Iterable[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


def _grouped(items: list[tuple[str, str]]) -> str:
    """"a, b (why); c (other why)": keys that share a reason are named together."""
    reasons: dict[str, list[str]] = {}
    for key, why in items:
        reasons.setdefault(why, []).append(key)
    return "; ".join(f"{', '.join(keys)} ({why})" for why, keys in reasons.items())
