"""The one error hierarchy: every failure callstream expects derives from `CallstreamError`.

The CLI turns any of them into one line that says what is wrong and what to do, and a non-zero
exit; the traceback shows only with the log level DEBUG. The first line of the message is that
line; further lines (a log's tail, say) are details shown only with DEBUG.
"""


class CallstreamError(Exception):
    """Base of every error callstream raises on purpose."""


class ConfigError(CallstreamError):
    """The configuration (environment, `.env`, a file it names) cannot be read or is invalid."""


class KafkaSetupError(CallstreamError):
    """The local broker could not be fetched, formatted, started or reached."""
