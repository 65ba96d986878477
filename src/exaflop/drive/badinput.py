"""The exception an importer raises to skip one drive and go on."""


class BadInput(Exception):
    """One input item is unusable (corrupt video, telemetry gap, ...): skip it and record why.

    The message is one line naming the file and the problem; it goes into the
    manifest's `skipped` list. Too many of these and the import stops (--max-bad-fraction).
    """
