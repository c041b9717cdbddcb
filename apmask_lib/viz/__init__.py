"""Figures (matplotlib, Agg backend, atomic PNG writes). One module per figure family:
``backbone`` (attention of backbones), ``synthetic`` (Fig. 1 panel, Fig. 4b grid of synthetic anomalies).
Modules are imported explicitly (``from apmask_lib.viz.synthetic import ...``) so that importing the
package does not pull in matplotlib."""
