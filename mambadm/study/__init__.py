"""The scaling study, built on top of the library (which never imports it).

`plan`     a grid's typed config and its expansion into cells (steps, tokens, FLOPs, time estimates);
`cell`     one cell: the training command, the evaluation command, its results row;
`grid`     the grid runner, cells one after another or as Ray tasks (`python -m mambadm.grid GRID.yaml`);
`fits`     power laws and the joint L(N, D) law with bootstrap intervals;
`scaling`  the scaling analysis of a grid's results.csv (`python -m mambadm.study.scaling`);
`eigen`    eigenvalues of the SSM state matrices of an export (`python -m mambadm.study.eigen`);
`plots`    the figures of both analyses.
"""
