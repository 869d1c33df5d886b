"""The RunPod Hub listing (.runpod/hub.json, .runpod/tests.json): the format the Hub reads, and content that is ours.

The format is checked against two JSON Schemas in tests/unit/data, written from RunPod's Hub publishing guide and the
official workers' `.runpod/` files (runpod-workers/worker-vllm, worker-sglang, worker-ollama, ...), by a small
validator here (`jsonschema` is not a dependency; the schemas use only the keywords it implements, and a test says
so). The content is checked against the project itself: every variable is one of lifecycle.settings' with that
table's default, presets and the test environment hold values the settings accept, and the test jobs pass the
handler's own job parser with a small max_tokens.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from handler.jobs import parse_job_input
from lifecycle.settings import VARS, _plain, read

ROOT = Path(__file__).resolve().parents[2]
HUB = ROOT / ".runpod" / "hub.json"
TESTS = ROOT / ".runpod" / "tests.json"
DATA = Path(__file__).resolve().parent / "data"

# What a user of the listing sets; the issue names these.
REQUIRED_ENV = ("MODEL_NAME", "MODEL_PATH", "MODEL_REPO", "MODEL_FILE", "MODEL_URL", "HF_TOKEN", "MODELS",
                "MODELS_MAX", "NGL", "CTX", "PARALLEL", "MAX_TOKENS", "EXTRA_ARGS", "BACKEND_WAIT_TIMEOUT",
                "EMBEDDINGS")
MODEL_VARS = ("MODEL_NAME", "MODEL_PATH", "MODEL_REPO", "MODEL_FILE", "MODEL_URL", "MODELS")
# The Hub's test jobs run on a fresh worker with the default model (SmolLM2-135M): keep them short.
MAX_TEST_TOKENS = 32
TEST_TIMEOUT_MS = (60_000, 600_000)


def load(path: Path) -> Any:
    return json.loads(path.read_text())


# --- A small JSON Schema validator (the keywords the schemas use) ---------------------------------------------------

KEYWORDS = {"$schema", "$comment", "$defs", "$ref", "type", "enum", "const", "required", "properties",
            "additionalProperties", "items", "minItems", "minLength", "minimum", "pattern", "allOf", "oneOf", "if",
            "then"}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def validate(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "$") -> list[str]:
    """The errors of `value` against `schema` (an empty list: valid), each naming where."""
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        return validate(value, target, root, path)
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[name](value) for name in types):
            return [f"{path}: {value!r} is not {' or '.join(types)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} is not {schema['const']!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if _TYPES["number"](value) and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value!r} is below {schema['minimum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], root, f"{path}[{i}]")
    if isinstance(value, dict):
        errors += [f"{path}: {key} is required" for key in schema.get("required", ()) if key not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += validate(item, properties[key], root, f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unknown field {key}")
            elif isinstance(extra, dict):
                errors += validate(item, extra, root, f"{path}.{key}")
    for sub in schema.get("allOf", ()):
        errors += validate(value, sub, root, path)
    if "oneOf" in schema:
        matching = sum(not validate(value, sub, root, path) for sub in schema["oneOf"])
        if matching != 1:
            errors.append(f"{path}: matches {matching} of the oneOf alternatives, not exactly 1")
    if "if" in schema and not validate(value, schema["if"], root, path):
        errors += validate(value, schema.get("then", {}), root, path)
    return errors


def schema_keywords(schema: Any) -> set[str]:
    """Every keyword used in `schema` (property names and $defs names excluded)."""
    found: set[str] = set()
    if isinstance(schema, dict):
        found |= set(schema)
        for key, item in schema.items():
            if key in ("properties", "$defs"):
                for sub in item.values():
                    found |= schema_keywords(sub)
            elif key not in ("enum", "const", "required", "$comment"):
                found |= schema_keywords(item)
    elif isinstance(schema, list):
        for item in schema:
            found |= schema_keywords(item)
    return found


HUB_SCHEMA = load(DATA / "runpod_hub.schema.json")
TESTS_SCHEMA = load(DATA / "runpod_tests.schema.json")


@pytest.mark.parametrize("schema", [HUB_SCHEMA, TESTS_SCHEMA], ids=["hub", "tests"])
def test_schemas_use_only_the_keywords_the_validator_checks(schema: dict[str, Any]) -> None:
    assert schema_keywords(schema) <= KEYWORDS, schema_keywords(schema) - KEYWORDS


def test_hub_json_follows_the_hub_format() -> None:
    assert validate(load(HUB), HUB_SCHEMA, HUB_SCHEMA) == []


def test_tests_json_follows_the_hub_format() -> None:
    assert validate(load(TESTS), TESTS_SCHEMA, TESTS_SCHEMA) == []


def _broken(doc: dict[str, Any], change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    change(doc)
    return doc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(category="llm"), "is not one of"),
        (lambda d: d.update(type="pod"), "is not one of"),
        (lambda d: d.pop("description"), "description is required"),
        (lambda d: d.update(titel="x"), "unknown field titel"),
        (lambda d: d["config"].pop("gpuIds"), "gpuIds is required"),
        (lambda d: d["config"].update(runsOn="CPU"), "cpuFlavor is required"),
        (lambda d: d["config"].update(containerDiskInGb="40"), "is not integer"),
        (lambda d: d["config"].update(allowedCudaVersions=["12"]), "does not match"),
        (lambda d: d["config"]["env"][0]["input"].update(type="secret"), "is not one of"),
        (lambda d: d["config"]["env"][0].update(value="x"), "oneOf"),
        (lambda d: d["config"]["env"][0]["input"].pop("description"), "description is required"),
        (lambda d: d["config"]["presets"][0].pop("defaults"), "defaults is required"),
    ],
)
def test_the_validator_catches_a_broken_hub_json(change: Any, message: str) -> None:
    errors = validate(_broken(load(HUB), change), HUB_SCHEMA, HUB_SCHEMA)
    assert any(message in error for error in errors), errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(tests=[]), "fewer than 1"),
        (lambda d: d["tests"][0].pop("input"), "input is required"),
        (lambda d: d["tests"][0].update(timeout=30.5), "is not integer"),
        (lambda d: d["config"].pop("gpuTypeId"), "oneOf"),
        (lambda d: d["config"].update(env=[{"key": "NGL", "value": 0}]), "is not string"),
    ],
)
def test_the_validator_catches_a_broken_tests_json(change: Any, message: str) -> None:
    errors = validate(_broken(load(TESTS), change), TESTS_SCHEMA, TESTS_SCHEMA)
    assert any(message in error for error in errors), errors


# --- Content: ours --------------------------------------------------------------------------------------------------

HUB_ENV: dict[str, dict[str, Any]] = {item["key"]: item for item in load(HUB)["config"]["env"]}


def env_string(value: Any, field: dict[str, Any] | None = None) -> str:
    """A hub.json value as the environment variable it becomes."""
    if isinstance(value, bool):
        field = field or {}
        return field.get("trueValue", "true") if value else field.get("falseValue", "false")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_listing_offers_the_variables_users_set() -> None:
    assert set(REQUIRED_ENV) <= set(HUB_ENV), set(REQUIRED_ENV) - set(HUB_ENV)


@pytest.mark.parametrize("key", sorted(HUB_ENV))
def test_each_variable_is_ours_with_our_default(key: str) -> None:
    var = VARS.get(key)
    assert var is not None, f"{key} is not a variable of lifecycle.settings"
    assert var.alias_of is None, f"{key} is an alias: list {var.alias_of}"
    field = HUB_ENV[key]["input"]
    given = env_string(field.get("default", ""), field)
    # The default as the settings table writes it; unset ones as an empty value (an empty value counts as unset).
    if var.default_from is None and var.default is not None:
        assert given == _plain(var.default), (key, given, _plain(var.default))
    else:
        assert given in (("", "auto") if var.kind == "auto_int" else ("",)), (key, given)
    # And read through the settings' own rules, the listed default is exactly the unset one.
    assert read(key, {key: given}) == read(key, {})


@pytest.mark.parametrize("key", sorted(HUB_ENV))
def test_each_input_fits_its_variable(key: str) -> None:
    var = VARS[key]
    field = HUB_ENV[key]["input"]
    kind = {"bool": "boolean", "int": "number", "float": "number"}.get(var.kind, "string")
    assert field["type"] in ((kind, "huggingface") if kind == "string" else (kind,)), (key, field["type"])
    if field["type"] == "boolean":
        assert read(key, {key: field["trueValue"]}) is True and read(key, {key: field["falseValue"]}) is False
    if "min" in field:
        assert field["min"] >= var.minimum, (key, field["min"], var.minimum)
        read(key, {key: env_string(field["min"])})  # the lowest value offered is allowed
    if "options" in field:
        assert [option["value"] for option in field["options"]] == list(var.choices)
    if key == "HF_TOKEN":
        assert field.get("default", "") == "" and "secret" in field["description"].lower()


@pytest.mark.parametrize("preset", load(HUB)["config"].get("presets", []), ids=lambda preset: preset["name"])
def test_presets_set_listed_variables_to_values_the_settings_accept(preset: dict[str, Any]) -> None:
    for key, value in preset["defaults"].items():
        assert key in HUB_ENV, f"preset {preset['name']!r} sets {key}, which the listing does not offer"
        read(key, {key: env_string(value, HUB_ENV[key]["input"])})  # a SettingsError fails the test


def _cuda_base() -> tuple[int, int]:
    """The CUDA version of the image the Hub builds (the root Dockerfile, unless .runpod/ has its own)."""
    dockerfile = ROOT / ".runpod" / "Dockerfile"
    dockerfile = dockerfile if dockerfile.exists() else ROOT / "Dockerfile"
    match = re.search(r"^ARG RUNTIME_IMAGE=nvidia/cuda:(\d+)\.(\d+)", dockerfile.read_text(), re.MULTILINE)
    assert match is not None, f"{dockerfile.name} is not a CUDA image, but the listing runs on GPUs"
    return int(match[1]), int(match[2])


def test_the_gpu_listing_builds_the_cuda_image_and_allows_only_drivers_that_run_it() -> None:
    hub, tests = load(HUB)["config"], load(TESTS)["config"]
    assert hub["runsOn"] == "GPU"
    base = _cuda_base()
    for versions in (hub["allowedCudaVersions"], tests["allowedCudaVersions"]):
        assert all(tuple(map(int, version.split("."))) >= base for version in versions), (versions, base)
    assert hub["allowedCudaVersions"] == tests["allowedCudaVersions"]


def test_the_hub_finds_its_other_files() -> None:
    # The Hub reads Dockerfile and README.md from .runpod/ or the repository root.
    for name in ("Dockerfile", "README.md"):
        assert (ROOT / ".runpod" / name).exists() or (ROOT / name).exists(), name


TEST_JOBS = load(TESTS)["tests"]


@pytest.mark.parametrize("job", TEST_JOBS, ids=lambda job: job["name"])
def test_each_test_job_passes_our_parser_and_is_short(job: dict[str, Any]) -> None:
    call = parse_job_input(job["input"], read("MAX_REQUEST_BODY_SIZE", {}))
    assert call.body is not None
    assert isinstance(call.body.get("max_tokens"), int), "a test job gives max_tokens, so it ends quickly"
    assert 1 <= call.body["max_tokens"] <= MAX_TEST_TOKENS
    assert TEST_TIMEOUT_MS[0] <= job["timeout"] <= TEST_TIMEOUT_MS[1]  # milliseconds: a cold start, then the job


def test_test_jobs_run_with_the_default_model_and_valid_settings() -> None:
    config = load(TESTS)["config"]
    assert len({job["name"] for job in TEST_JOBS}) == len(TEST_JOBS)
    for item in config.get("env", []):
        key = item["key"]
        assert key in VARS and key not in MODEL_VARS, key  # no model setting: the default model answers
        read(key, {key: item["value"]})
    assert config["gpuCount"] == load(HUB)["config"]["gpuCount"]
