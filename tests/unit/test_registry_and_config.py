import json
import subprocess
import sys

import pytest

import keiryo
from keiryo._registry import Registry
from keiryo.config import KeiryoConfig
from keiryo.errors import ConfigError
from keiryo.passes import all_passes


def test_registry_rejects_duplicates_and_names_known_entries():
    r: Registry[int] = Registry("thing")
    r.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        r.add("a", 2)
    with pytest.raises(ConfigError, match="unknown thing 'b'; expected one of: a"):
        r.get("b")


@pytest.mark.parametrize("spec", all_passes(), ids=lambda s: s.name)
def test_every_pass_config_round_trips_and_rejects_unknown_fields(spec):
    cfg = spec.config()
    assert spec.config.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown field 'no_such_field'"):
        spec.config.parse({"no_such_field": 1})


def test_zoo_option_configs_round_trip():
    from keiryo.model.zoo import ZOO

    for name in ZOO:
        opts = ZOO.get(name).options()
        assert type(opts).from_json(opts.to_json()) == opts


def test_config_error_names_field_and_value():
    class C(KeiryoConfig):
        n: int = 1

    with pytest.raises(ConfigError, match=r"where: n: .*got 'x'"):
        C.parse({"n": "x"}, where="where")


def test_public_api_matches_all():
    public = {n for n in dir(keiryo) if not n.startswith("_")} | {"__version__"}
    assert set(keiryo.__all__) == public
    for name in keiryo.__all__:
        assert getattr(keiryo, name) is not None


def test_import_keiryo_stays_lean():
    heavy = ("onnx", "onnxruntime", "torch", "coremltools", "ray", "ai_edge_litert", "litert_torch", "fastapi", "model_signing")
    code = f"import json, sys, keiryo; print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_error_tree_has_one_root():
    from keiryo import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.KeiryoError)
