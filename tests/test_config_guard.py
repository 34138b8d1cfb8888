"""config_guard: every import a config value names passes the allowlist where jsonargparse resolves it; a marker
module proves that a refused import never happened."""
import json
import sys
import typing

import pytest
import yaml

from dreambooth_pl import config_guard
from dreambooth_pl.cli import DreamBoothCLI
from conftest import REPO, fit_args

MARKER = "dbpl_marker_module"


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """A module that, once imported, leaves a file beside itself: a refused value must never create it."""
    folder = tmp_path / "marker"
    folder.mkdir()
    (folder / f"{MARKER}.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_suffix('.imported').touch()\n"
        "def s(*args, **kwargs):\n    return 1\n\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MARKER, raising=False)
    flag = folder / f"{MARKER}.imported"

    def imported() -> bool:
        return flag.exists() or MARKER in sys.modules

    yield imported
    sys.modules.pop(MARKER, None)


def _hostile(tmp_path, subject_dirs, how: str, key: str, value) -> list[str]:
    """A tiny fit command line with ``key: value`` given in a YAML config (``yaml``) or on the command line."""
    args = fit_args("unused", *subject_dirs, str(tmp_path / "logs"))
    if how == "cli":
        return args + [f"--{key}={value if isinstance(value, str) else json.dumps(value)}"]
    tree: dict = {}
    node = tree
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(tree))
    return [args[0], "--config", str(path), *args[1:]]


THROUGHPUT = "lightning.pytorch.callbacks.ThroughputMonitor"


@pytest.mark.parametrize("how", ["yaml", "cli"])
@pytest.mark.parametrize("key, value, named", [
    # issue 29 cases 1-3: a callable argument of a Lightning class, and a class name where a string is accepted too
    ("trainer.callbacks", [{"class_path": THROUGHPUT, "init_args": {"batch_size_fn": f"{MARKER}.s"}}],
     "trainer.callbacks[0].init_args.batch_size_fn"),
    ("trainer.profiler", f"{MARKER}.Thing", "trainer.profiler"),
    ("trainer.logger", {"class_path": f"{MARKER}.Thing"}, "trainer.logger.class_path"),
    # a Lightning function where a callable is taken: only the project's own functions are
    ("trainer.callbacks", [{"class_path": THROUGHPUT, "init_args": {
        "batch_size_fn": "lightning.pytorch.utilities.seed.isolate_rng"}}], "batch_size_fn"),
])
def test_hostile_values_are_refused_by_key_before_any_import(how, key, value, named, marker, subject_dirs,
                                                              tmp_path, capsys):
    args = _hostile(tmp_path, subject_dirs, how, key, value)
    with pytest.raises(config_guard.UntrustedConfigError) as err:
        DreamBoothCLI(args=args)
    msg = str(err.value)
    assert named in msg and "refused, nothing imported" in msg and config_guard.TRUST_ENV in msg
    assert not marker()
    assert "usage:" not in capsys.readouterr().err  # one message, not the parser's page of usage


def test_the_issues_own_values_import_nothing(subject_dirs, tmp_path, capsys, monkeypatch):
    """``sys.exit`` (called every batch) and ``this.s`` (imports ``this``, which prints the Zen of Python)."""
    monkeypatch.delitem(sys.modules, "this", raising=False)
    for fn in ("sys.exit", "this.s"):
        args = _hostile(tmp_path, subject_dirs, "yaml", "trainer.callbacks",
                        [{"class_path": THROUGHPUT, "init_args": {"batch_size_fn": fn}}])
        with pytest.raises(config_guard.UntrustedConfigError, match=rf"batch_size_fn = {fn}: it is outside"):
            DreamBoothCLI(args=args)
    with pytest.raises(config_guard.UntrustedConfigError, match=r"--trainer.profiler = this.Whatever"):
        DreamBoothCLI(args=fit_args("unused", *subject_dirs, str(tmp_path)) + ["--trainer.profiler", "this.Whatever"])
    assert "this" not in sys.modules
    assert "Beautiful is better than ugly" not in capsys.readouterr().out


def test_a_profiler_name_lightning_does_not_know_is_one_message(subject_dirs, tmp_path):
    with pytest.raises(ValueError, match="trainer.profiler 'bogus' is not one of simple, advanced"):
        DreamBoothCLI(args=fit_args("unused", *subject_dirs, str(tmp_path)) + ["--trainer.profiler", "bogus"])


@pytest.mark.parametrize("value", ["false", "0", "yes", "true", " 1"])
def test_only_exactly_1_trusts(value, monkeypatch, subject_dirs, tmp_path):
    monkeypatch.setenv(config_guard.TRUST_ENV, value)
    with pytest.raises(config_guard.UntrustedConfigError, match=rf"{config_guard.TRUST_ENV}='{value}' is not "
                                                                 "understood: set it to exactly 1"):
        DreamBoothCLI(args=fit_args("unused", *subject_dirs, str(tmp_path)))


def test_trust_lets_the_import_happen(marker, monkeypatch):
    """The positive control: the same value, trusted, does import the marker (so the tests above can fail)."""
    monkeypatch.setenv(config_guard.TRUST_ENV, "1")
    argv = ["--data.photos.dir=x", "--data.photos.prompt=y",
            "--trainer.callbacks=" + json.dumps({"class_path": THROUGHPUT,
                                                 "init_args": {"batch_size_fn": f"{MARKER}.s"}})]
    with config_guard.guarded(argv) as guard:
        _fit_parser().parse_args(argv)
        guard.check()
    assert marker()


def test_allowlist():
    ok = ["dreambooth_pl.cli._seed", "dreambooth_pl.checkpoint_io.AtomicCheckpointIO", "torch.optim.AdamW",
          "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.callbacks.ThroughputMonitor"]
    assert [p for p in ok if config_guard.why_refused(p)] == []
    bad = {"lightning.pytorch.callbacks.LambdaCallback": "calls whatever function",
           "lightning.pytorch.utilities.seed.isolate_rng": "only this project's own functions",
           "torch.optim.lr_scheduler.warnings": "only this project's own functions",  # a module re-exported
           "lightning.pytorch.not_loaded_module.X": "not a class that Lightning or torch.optim has loaded",
           "os.system": "outside", "builtins.eval": "outside"}
    assert {p: why for p, why in bad.items() if why not in (config_guard.why_refused(p) or "")} == {}


# --- the walk: every parameter of fit's parser that takes a class or a callable, and those of every class it
# accepts there, is given the marker; none may import it


_PARSER = []


def _fit_parser():
    """fit's own parser (DreamBoothCLI's, built once), stopped before anything is instantiated."""
    if not _PARSER:
        class Built(Exception):
            pass

        class Grab(DreamBoothCLI):
            def before_instantiate_classes(self):
                raise Built(self.parser)

        try:
            Grab(args=["fit", "--data.photos.dir=x", "--data.photos.prompt=y"])
        except Built as b:
            _PARSER.append(b.args[0]._subcommands_action._name_parser_map["fit"])
    return _PARSER[0]


def _kind(typehint) -> str | None:
    """How a value of this type can make the parser import: ``callable``, ``class``, ``any`` (a ``class_path``
    dict may be built) or None."""
    import inspect

    from jsonargparse._typehints import ActionTypeHint

    if typehint in (typing.Any, inspect.Parameter.empty, object):
        return "any"
    if ActionTypeHint.is_callable_typehint(typehint) or ActionTypeHint.is_return_subclass_typehint(typehint):
        return "callable"
    if typehint is type or typing.get_origin(typehint) is type or (
            ActionTypeHint.is_subclass_typehint(typehint, all_subtypes=False, also_lists=True)):
        return "class"
    if typing.get_origin(typehint) is typing.Literal:
        return None
    kinds = [_kind(a) for a in typing.get_args(typehint) if not isinstance(a, (str, int, list))]
    return next((k for k in ("callable", "class", "any") if k in kinds), None)


def _walk() -> list[tuple[str, str, str]]:
    """(key, command-line value, kind) for each parameter that takes a class or a callable: fit's own, then the
    constructor parameters of every class the allowlist accepts under those keys."""
    from jsonargparse._parameter_resolvers import get_signature_parameters
    from jsonargparse._typehints import ActionTypeHint, get_all_subclass_paths, get_subclass_types
    from jsonargparse._util import import_object

    values = {"callable": f"{MARKER}.s", "class": f"{MARKER}.Thing", "any": json.dumps({"class_path": f"{MARKER}.Thing"})}
    cases = []
    for action in _fit_parser()._actions:
        kind = _kind(getattr(action, "_typehint", None)) if isinstance(action, ActionTypeHint) else None
        if kind is None:
            continue
        cases.append((action.dest, values[kind], kind))
        for base in get_subclass_types(action._typehint, also_lists=True) or ():
            for path in get_all_subclass_paths(base):
                if config_guard.why_refused(path):
                    continue  # a class the allowlist refuses is itself covered by the case above
                for param in get_signature_parameters(import_object(path, check_path=False), None, logger=False):
                    inner = _kind(param.annotation)
                    if inner:
                        value = json.loads(values[inner]) if inner == "any" else values[inner]
                        spec = {"class_path": path, "init_args": {param.name: value}}
                        cases.append((f"{action.dest} {path}.{param.name}", json.dumps(spec), inner))
    return cases


def test_every_class_or_callable_parameter_of_fit_is_covered(marker):
    """For each parameter: refused by name, or taken as a plain value (a ``str`` member of its union) with nothing
    imported. Callable parameters, and class parameters that take no string, must be refused."""
    cases = _walk()
    keys = {c[0].split(" ")[0] for c in cases}
    assert {"trainer.callbacks", "trainer.logger", "trainer.profiler", "trainer.plugins", "trainer.strategy",
            "trainer.accelerator"} <= keys
    assert any("ThroughputMonitor.batch_size_fn" in c[0] for c in cases)
    refused, not_refused, imported = [], [], []
    for key, value, kind in cases:
        argv = ["--data.photos.dir=x", "--data.photos.prompt=y", f"--{key.split(' ')[0]}={value}"]
        try:
            with config_guard.guarded(argv) as guard:
                _fit_parser().parse_args(argv)
                guard.check()
            not_refused.append(key)
        except config_guard.UntrustedConfigError as e:
            assert MARKER in str(e), (key, str(e))
            refused.append(key)
        except SystemExit:  # the parser rejected the value for another reason (a type it cannot take)
            not_refused.append(key)
        if marker():
            imported.append(key)
    assert imported == []
    must = [k for k, _, kind in cases if kind == "callable"]
    assert [k for k in must if k not in refused] == []
    assert len(refused) >= 10, refused


def test_shipped_configs_name_only_allowed_classes():
    for path in sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "perf").glob("*.yaml")):
        argv = ["--data.photos.dir=x", "--data.photos.prompt=y", "--config", str(path)]
        with config_guard.guarded(argv) as guard:
            _fit_parser().parse_args(argv)
            guard.check()
