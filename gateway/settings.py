"""Gateway settings: `CALLSTREAM_*` variables (and `.env`), read once when the app is built."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from kernel.settings import CommonSettings


class ConfigError(ValueError):
    """The gateway cannot start with this configuration."""


class GatewaySettings(CommonSettings):
    api_keys: SecretStr | None = None
    retell_api_key: SecretStr | None = Field(default=None, validation_alias="RETELL_API_KEY")
    allow_unsigned: bool = False
    max_body_bytes: int = 10 * 1024 * 1024
    # Well under the sender's 10 s, so that it gets our 503 and retries rather than timing out.
    publish_timeout_s: float = 5.0
    retry_after_s: int = 5
    # Source allowlist: empty allows every source. UponAI sends from 100.20.5.228.
    allowed_sources: str = ""
    # Only these peers' X-Forwarded-For is believed.
    trusted_proxies: str = ""
    # Serve POST /webhook from a lean ASGI path (same logic, same OpenAPI); false: the FastAPI route.
    webhook_fast_path: bool = True

    @model_validator(mode="after")
    def _need_a_key(self) -> GatewaySettings:
        if not self.keys() and not self.allow_unsigned:
            raise ConfigError(
                "no API key: set CALLSTREAM_API_KEYS (comma-separated) or RETELL_API_KEY, "
                "or CALLSTREAM_ALLOW_UNSIGNED=true for local experiments"
            )
        return self

    def keys(self) -> list[bytes]:
        """The API keys that may sign a webhook (several during a rotation)."""
        raw = self.api_keys or self.retell_api_key
        if raw is None:
            return []
        return [k.strip().encode() for k in raw.get_secret_value().split(",") if k.strip()]

    def allowed_source_list(self) -> list[str]:
        return [s.strip() for s in self.allowed_sources.split(",") if s.strip()]

    def trusted_proxy_list(self) -> list[str]:
        return [s.strip() for s in self.trusted_proxies.split(",") if s.strip()]
