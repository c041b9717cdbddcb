"""What both training stages share: the stage shell (``stage``: :class:`~apmask_lib.training.stage.Stage`,
the steps of a run around the stage's hooks build, restore, step, state, export), a run folder
(``runfolder``: lock, done marker, resume and its fingerprint check) and the loop (``loop``: logs, saves,
one progress line per epoch)."""
