"""The base of every params.yaml section: unknown keys are errors and a loaded config never changes."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
