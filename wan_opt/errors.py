"""The one exception type for mistakes a user can make, printed as one sentence and never as a traceback, and
the sentence for a config that Hydra cannot compose."""
import re


class WanOptError(Exception):
    """Bad input or an environment problem the user can fix; the message says what to do."""


def config_error_sentence(error: Exception) -> str:
    """Hydra's error for a config it cannot compose, as one sentence. Hydra's own text runs to several lines
    (its search path, its grammar's help) and, for an unknown setting, suggests appending it with `+`, which the
    schema then refuses anyway."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    lines = str(error).splitlines()
    cause = error.__cause__
    if isinstance(error, MissingConfigException):  # "In 'config': Could not find 'hardware/h1000'", then choices
        found = lines[0].split(": ", 1)[-1]
        starts = [i for i, line in enumerate(lines) if line.startswith("Available options")]
        choices = []
        for line in lines[starts[0] + 1:] if starts else []:
            if not line.startswith("\t"):
                break
            choices.append(line.strip())
        return f"{found}: choose one of {', '.join(choices)}." if choices else f"{found}."
    if isinstance(error, OverrideParseException):
        return (f"Could not read an override ({lines[0]}): quote a value with spaces or brackets inside it, "
                f"e.g. 'prompt=\"a fox (red)\"'.")
    if (added := re.match(r"Could not append to config\. An item is already at '(.+)'", lines[0])) is not None:
        return f"{added.group(1)} is already a setting: set it without the +, e.g. {added.group(1)}=VALUE."
    if (group := re.match(r"Multiple values for (\w+)|(\w+) appears more than once", lines[0])) is not None:
        name = group.group(1) or group.group(2)
        return f"The {name} group already has a choice: set it without the +, e.g. {name}=NAME."
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return (f"There is no setting '{cause.full_key}': check its name "
                "(`python run.py --cfg job` prints every setting).")
    if isinstance(cause, ValidationError):  # "Error merging override seed=abc"
        override = lines[0].removeprefix("Error merging override ")
        reason = str(cause).splitlines()[0].rstrip(".")
        if (words := re.search(r"expected one of \[(.*)\]", reason)) is not None:  # a knob's fixed words
            return f"{override} is not one of: {words.group(1)}."
        return f"{override} is not valid: {reason}."
    return f"{lines[0].rstrip('.')}: check the setting's name and value."
