"""Measurements on this machine and what stamps them.

``calibrate`` (with ``calibrate_fit`` and ``calibrate_gpu``) times the CPU tier, the GPU tier and the
PCIe link and writes a hardware profile; ``host`` times the runtime's host work per MoE layer call for
the profile's ``host`` section; ``fidelity`` and ``fidelity_run`` replay one routing through the runtime
and the simulator and compare their times; ``provenance`` is the commit and machine stamped on results.
"""
