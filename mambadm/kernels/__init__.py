"""The compiled and Triton kernels, and their build: used by `mambadm.ssm` (the scans, the conv) and by
`mambadm.model` (the C++ acting step), neither of which builds the other's code.

    csrc/mamba_cpu.cpp, csrc/mamba_cpu.h   the CPU selective scan and causal conv + SiLU (the `cpp` backend)
    csrc/gloma_step.cpp                    MambaDM's whole-stack recurrent acting step (`GLoMaStack`)
    build.py                               compiles and loads the CPU extension (compiler, ISA, OpenMP, ninja)
    triton_scan.py                         the Triton selective-scan kernels (launched by mambadm/ssm/scan_triton.py)
    triton_conv.py                         the Triton conv + bias + SiLU kernels (launched by mambadm/ssm/conv_triton.py)
"""
