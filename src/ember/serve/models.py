"""Request and reply bodies of the daemon's API (pydantic: validated, and its OpenAPI schema).

Limits here are the API's own bounds, so a malformed or oversized body is a
422 before anything reaches a sandbox.  Templates are names, never paths.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ember.spec import DEFAULT_MEM_MIB

TemplateName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
MetaKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]
MetaValue = Annotated[str, Field(max_length=256)]
Seconds = Annotated[float, Field(gt=0, le=30 * 86400)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NetworkBody(Strict):
    allow: list[Annotated[str, Field(min_length=1, max_length=300)]] = Field(
        default_factory=list, max_length=256,
        description="addresses (10.0.0.5, 10.0.0.0/24) or DNS names (pypi.org, *.pypi.org), "
        "each optionally :PORT or :FIRST-LAST",
    )  # fmt: skip
    internet: bool = Field(False, description="the public internet too")


class ExposeBody(Strict):
    port: int = Field(..., ge=1, le=65535, description="a TCP port of the guest")


class ExposeReply(BaseModel):
    address: str
    port: int


class CreateBody(Strict):
    template: TemplateName | None = Field(None, description="a template name (default: default)")
    mem_mib: int = Field(DEFAULT_MEM_MIB, ge=64, le=65536, description="guest RAM")
    vcpus: int = Field(1, ge=1, le=64)
    cpus: float | None = Field(None, gt=0, le=256, description="CPU quota, in CPUs")
    memory_mib: int | None = Field(None, ge=64, le=1 << 20, description="the VMM's memory cap")
    pids: int | None = Field(None, ge=8, le=1 << 20)
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=64)
    timeout: Seconds | None = Field(None, description="seconds until the daemon kills it")
    network: bool | NetworkBody | None = Field(
        None, description="off by default; true: the internet; or an egress allow-list"
    )
    idle_timeout: Seconds | None = Field(
        None, description="seconds without an API call (and no stream open) until it is killed"
    )
    on_timeout: Literal["kill", "pause"] = Field(
        "kill", description="what either timeout does: kill it, or pause it (resumable by id)"
    )


class ForkBody(Strict):
    metadata: dict[MetaKey, MetaValue] | None = Field(
        default=None, max_length=64, description="the fork's metadata (default: the parent's)"
    )
    timeout: Seconds | None = Field(
        default=None, description="seconds until the daemon kills the fork; null: never "
        "(left out: the parent's deadline)",
    )  # fmt: skip


def _not_default(name: str) -> str:
    if name == "default" or name.startswith("default-"):
        raise ValueError("'default' and 'default-*' are the daemon's own template names")
    return name


class SnapshotBody(Strict):
    name: Annotated[TemplateName, AfterValidator(_not_default)] = Field(
        ..., description="the template to save (a name, never a path; replaces one so named)"
    )


class TemplateReply(BaseModel):
    template: str


class SandboxInfo(BaseModel):
    id: str
    state: Literal["running", "paused", "crashed"]
    template: str
    created_at: float
    expires_at: float | None
    metadata: dict[str, str]
    mem_mib: int | None
    vcpus: int | None
    idle_timeout: float | None = None
    on_timeout: Literal["kill", "pause"] = "kill"
    address: str | None = Field(None, description="networked: its address on the daemon's host")
    error: str | None = None


class SandboxList(BaseModel):
    sandboxes: list[SandboxInfo]


class TimeoutBody(Strict):
    timeout: Seconds | None = Field(..., description="seconds from now; null: no timeout")


Cmd = (
    Annotated[str, Field(min_length=1, max_length=1 << 20)]
    | Annotated[
        list[Annotated[str, Field(max_length=1 << 20)]], Field(min_length=1, max_length=4096)
    ]
)
Env = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=256)], str], Field(max_length=1024)
]
Cwd = Annotated[str, Field(min_length=1, max_length=4096)]
Files = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=4096)], str], Field(max_length=1024)
]


class ExecBody(Strict):
    cmd: Cmd = Field(..., description="argv list, or a shell command line")
    timeout: Seconds | None = None
    env: Env | None = None
    cwd: Cwd | None = None
    stdin: str | None = Field(None, description="base64 bytes for the process's stdin")
    files: Files | None = Field(
        None, description="guest path -> base64 bytes, written before the command starts"
    )
    stream: bool = Field(False, description="reply NDJSON lines as output is produced")
    max_output: int | None = Field(64 << 20, ge=0, le=1 << 30)


class ExecReply(BaseModel):
    exit_code: int | None
    signal: int | None
    stdout: str = Field(description="base64")
    stderr: str = Field(description="base64")
    timed_out: bool
    duration: float


class CodeBody(Strict):
    code: Annotated[str, Field(max_length=16 << 20)]
    timeout: Seconds | None = None
    stream: bool = Field(False, description="reply NDJSON: output lines as the cell writes, "
                         "then the result")  # fmt: skip


class CodeErrorModel(BaseModel):
    type: str
    message: str
    traceback: str


class CodeReply(BaseModel):
    stdout: str
    stderr: str
    value: str | None
    error: CodeErrorModel | None


class FileStatReply(BaseModel):
    size: int
    mode: int
    mtime: float
    is_dir: bool
    is_file: bool


class DirEntryModel(BaseModel):
    name: str
    size: int
    is_dir: bool


class DirList(BaseModel):
    entries: list[DirEntryModel]


class WriteReply(BaseModel):
    size: int


class ErrorDetail(BaseModel):
    code: str = Field(description="stable: unauthorized, not_found, invalid_request, ...")
    message: str


class ErrorReply(BaseModel):
    error: ErrorDetail
