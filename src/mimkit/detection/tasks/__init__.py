"""The dense-transfer commands: ``mimkit detect-train`` / ``detect-eval`` (:mod:`.detect`) and ``mimkit
seg-train`` / ``seg-eval`` (:mod:`.segment`), built on the packages beside this one."""
