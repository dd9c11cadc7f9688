"""The catalog pipeline around the Perfusion core: manifests, planning, the store and its Delta index, Ray
fan-out of trainings, Ray Data rendering, and the `perfusion-batch` command (pipeline/cli/). README "How it
works" follows one concept through these modules in order.

Uses perfusion/ only through its public API (`import perfusion`), and its methods only through
perfusion.methods.
"""
