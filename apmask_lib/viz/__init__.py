"""Figures (matplotlib, Agg backend, atomic PNG writes). One module per figure family:
``figure`` (what every figure carries: the run label, colourbars, saving), ``localization``
(Fig. 4a heatmaps), ``roc``, ``tsne`` (Fig. 5), ``evaluation`` (the figures of an evaluation run),
``synthetic`` (Fig. 1 panel, Fig. 4b grid of synthetic anomalies), ``paper`` (Fig. 1 and 4b for a
configured data set), ``backbone`` (attention of backbones), ``curves`` (training and learning curves).
Modules are imported explicitly (``from apmask_lib.viz.synthetic import ...``) so that importing the
package does not pull in matplotlib."""
