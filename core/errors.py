"""The two errors a person is shown as one line, whatever the surface (the CLI prints it and
exits 1; the web app shows it beside what was typed).

`Refused`: what was asked cannot be done as asked (unknown referral, a value that does not
read, an action the referral's stage does not allow); nothing was changed. `SettingsError`:
the installation is misconfigured (a setting, program.yaml, the key ring, the database
schema); nothing starts until it is fixed. Subclasses carry more for whoever can use it (a
form's field errors, a duplicate's receipt), never a different meaning."""


class Refused(Exception):
    """What was asked cannot be done; the message is the one line the user sees."""


class SettingsError(Exception):
    """A setting is missing or malformed; the message is one line naming each."""
