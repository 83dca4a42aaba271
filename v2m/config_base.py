"""The base of every params.yaml section: unknown keys are errors and a loaded config never changes."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # hide_input_in_errors: a refused value may hold a secret (listening.db with a password in its URL); errors
    # name the key and the reason (config._format_error), never echo the value, not even in a traceback.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
