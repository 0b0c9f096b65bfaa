"""Settings of an OpenAI-compatible chat-completions endpoint, shared by generation and the judge."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class EndpointConfig(BaseModel):
    """Where requests go and how they are retried; sections that call an LLM extend it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base_url: str | None = Field(
        None, description="API root such as http://host:8000/v1 (default: $OPENAI_BASE_URL, else OpenAI's)."
    )
    model: str | None = Field(None, description="Model name sent to the endpoint.")
    api_key: SecretStr | None = Field(
        None, description="API key (default: $OPENAI_API_KEY); never printed or logged."
    )
    max_tokens: int = Field(1024, gt=0, description="Most tokens per reply; longer replies are skipped.")
    request_timeout_s: float = Field(120.0, gt=0, description="Timeout of one HTTP request attempt.")
    max_retries: int = Field(
        5, ge=0, description="Retries on 429, 5xx, timeouts and connection errors, after the first try."
    )
    backoff_initial_s: float = Field(
        1.0, ge=0, description="First retry wait; doubles each retry, with jitter (Retry-After wins)."
    )
    backoff_max_s: float = Field(60.0, ge=0, description="Longest wait between two attempts.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("use an http:// or https:// URL such as http://127.0.0.1:8000/v1")
        return value
