"""What both training stages share: a run folder (``runfolder``: lock, done marker, resume and its
fingerprint check) and the loop (``loop``: logs, saves, one progress line per epoch)."""
