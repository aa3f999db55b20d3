"""The scaling study, built on top of the library (which never imports it).

`plan`             a grid's typed config and its expansion into cells (steps, tokens, FLOPs, time estimates; isoFLOP);
`cell`             one cell: the training command, the evaluation command, its results row;
`grid`             the grid runner: cells one after another, as Ray tasks or as Slurm jobs (`python -m mambadm.grid`);
`slurm`            the Slurm dispatch: job arrays, following jobs, requeue and resume;
`tracking`         each cell as a run of an experiment tracker (MLflow, W&B) in the grid's experiment;
`fits`             power laws and the joint L(N, D) law, with their degrees of freedom and intervals;
`claim`            the paper's "2x data vs a bigger model" claim judged from the numbers, with intervals;
`caveats`          warnings: truncated or saturated scores, validation loss that stopped early, one seed;
`scaling`          the scaling analysis of a grid's results.csv (`python -m mambadm.study.scaling`);
`compute_optimal`  isoFLOP profiles, the compute-optimal frontier, forecasts and plans
                   (`python -m mambadm.study.compute_optimal`);
`eigen`            eigenvalues of the SSM state matrices of an export against its initialisation
                   (`python -m mambadm.study.eigen`);
`plots`, `figures_compute`  the figures; `report` the study's report.md and self-contained report.html.
"""
