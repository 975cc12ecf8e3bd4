"""Pipeline configuration: one YAML file, one pydantic model per stage section, unknown keys are errors.

Relative paths in a config (inputs, work_dir) are resolved against the directory of the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from cptflow.tasks.clean import CleanConfig, SourceConfig
from cptflow.tasks.cpt import CptConfig
from cptflow.tasks.evaluate import EvaluateConfig
from cptflow.tasks.mix import MixConfig
from cptflow.tasks.perplexity import PerplexityConfig
from cptflow.tasks.quality import QualityConfig
from cptflow.tasks.sft import SftConfig
from cptflow.tasks.tokenize import TokenizeConfig


class ConfigError(ValueError):
    """A config problem, stated with the file, the key and what is allowed."""


class RunnerConfig(BaseModel):
    """Where data-stage shards run: threads (default), local processes, a Dask cluster (prefect-dask) or a
    Ray cluster (prefect-ray)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["threads", "processes", "dask", "ray"] = "threads"
    max_workers: int | None = Field(None, gt=0, description="threads/processes; default: number of cores")
    dask_address: str | None = Field(
        None, description="Address of an existing Dask scheduler; None starts a local cluster"
    )
    dask_workers: int = Field(2, gt=0, description="Workers of the local Dask cluster")
    ray_address: str | None = Field(
        None, description="Address of an existing Ray cluster ('ray://head:10001' or 'auto'); None starts a local one"
    )


class NotifyConfig(BaseModel):
    """Where a failed run is announced, besides its `pipeline-failure` artifact (see flows/failure.py)."""

    model_config = ConfigDict(extra="forbid")
    # SecretStr: shown as '**********' in reprs and in the flow-run parameters the Prefect UI displays.
    webhook_url: SecretStr | None = Field(
        None, description="POST {pipeline, stage, error, command} as JSON to this URL; a secret, never logged"
    )
    prefect_block: str | None = Field(
        None, description="A saved Prefect notification block, '<block-type>/<name>', e.g. 'slack-webhook/ml-alerts'"
    )


class GpuConcurrencyConfig(BaseModel):
    """The Prefect global concurrency limit training stages hold a slot of (created if missing)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field("gpu", description="Limit name; null: no limit")
    limit: int = Field(1, gt=0, description="Slots when cptflow creates the limit (change it in the UI)")


class LaunchConfig(BaseModel):
    """How the training stages (cpt, sft, evaluate) run: as a child process tree started by torchrun or
    `accelerate launch`, its output streamed into the Prefect run log (see cptflow/launch.py), or inline
    in the flow's own process (debugging)."""

    model_config = ConfigDict(extra="forbid")
    launcher: Literal["torchrun", "accelerate", "inline"] = "torchrun"
    num_processes: int = Field(
        1, gt=0, description="Data-parallel processes (one per GPU) for cpt and sft; evaluate uses one"
    )
    timeout_minutes: float | None = Field(
        None, gt=0, description="Kill a training stage's process tree after this long"
    )
    accelerate_config: str | None = Field(None, description="A config file for `accelerate launch --config_file`")

    @model_validator(mode="after")
    def _inline_is_one_process(self) -> "LaunchConfig":
        if self.launcher == "inline" and self.num_processes > 1:
            raise ValueError("launch.num_processes > 1 needs launcher torchrun or accelerate, not inline")
        return self


class ResultsConfig(BaseModel):
    """Where Prefect keeps the stages' task results (the records that make a finished stage come back
    `Cached` on a retry). Default: Prefect's local storage (~/.prefect/storage). For retries across
    containers or machines, name a saved Prefect filesystem block (s3-bucket/..., gcs-bucket/...,
    azure-blob-storage-container/..., remote-file-system/... for any fsspec URL)."""

    model_config = ConfigDict(extra="forbid")
    local_path: str | None = Field(None, description="A local directory (relative to the config file)")
    block: str | None = Field(
        None, pattern=r"^[a-z0-9-]+/[A-Za-z0-9_-]+$", description="A saved Prefect storage block, '<block-type>/<name>'"
    )

    @model_validator(mode="after")
    def _one_place(self) -> "ResultsConfig":
        if self.local_path and self.block:
            raise ValueError("results: give local_path or block, not both")
        return self


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    work_dir: str = Field("work", description="Stage outputs go to <work_dir>/<stage>/<fingerprint>/")
    base_model: str = Field(description="'builtin:tiny-llama', a local from_pretrained directory, or a hub id")
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code")
    seed: int = 0
    input_fingerprint: Literal["mtime", "content"] = Field(
        "mtime", description="How input files enter the clean fingerprint: size+mtime (fast) or sha256 of content"
    )
    runner: RunnerConfig = RunnerConfig()
    sources: list[SourceConfig] = Field(min_length=1)
    clean: CleanConfig = CleanConfig()
    quality: QualityConfig = QualityConfig()
    perplexity: PerplexityConfig = PerplexityConfig()
    mix: MixConfig = MixConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    cpt: CptConfig = CptConfig()
    sft: SftConfig = SftConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    notify: NotifyConfig = NotifyConfig()
    gpu_concurrency: GpuConcurrencyConfig = GpuConcurrencyConfig()
    launch: LaunchConfig = LaunchConfig()
    results: ResultsConfig = ResultsConfig()

    # Set by load_config, not by the YAML: where relative paths start.
    base_dir: str = Field(".", exclude=True)

    @model_validator(mode="after")
    def _unique_source_names(self) -> "PipelineConfig":
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicates)}")
        unknown = sorted(set(self.perplexity.apply_to or []) - set(names))
        if unknown:
            raise ValueError(f"perplexity.apply_to names unknown sources {unknown}; sources are {names}")
        return self

    def resolve(self, path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else (Path(self.base_dir) / candidate).resolve()

    @property
    def work_path(self) -> Path:
        return self.resolve(self.work_dir)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at the place an error points to (walks nested models and lists)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        current = None
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            inner = (candidate, *getattr(candidate, "__args__", ()))
            for option in inner:
                if isinstance(option, type) and issubclass(option, BaseModel):
                    current = option
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [name for name, f in current.model_fields.items() if not f.exclude]
    return []


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] = PipelineConfig) -> str:
    lines = [f"{source}: invalid configuration"]
    for error in err.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            lines.append(f"  - unknown key '{key}'" + (f" (allowed here: {', '.join(allowed)})" if allowed else ""))
        elif error["type"] == "missing":
            lines.append(f"  - missing required key '{key}'")
        else:
            got = error.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"  - {key}: {error['msg']}{shown}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the last
    one silently, so a second `cpt:` section would quietly replace the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' appears twice in one mapping (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, work_dir: str | Path | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML; `work_dir` (e.g. from --work-dir) overrides the file's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if "base_dir" in data:
        raise ConfigError(f"{path}: unknown key 'base_dir'")
    if work_dir is not None:
        data["work_dir"] = str(Path(work_dir).resolve())
    try:
        config = PipelineConfig.model_validate(dict(data, base_dir=str(path.resolve().parent)))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
    return config
