"""The expert-parallel data path of one rank: joining the group (`group`), dispatch and combine
(`dispatch`), the engine with its stacked expert slots (`engine`, `slots`), two-batch overlap
(`two_batch`), how a step runs (`runner`) and token choice (`sampling`). Switching plans is the
switch room's; the engine only installs a plan's slots (`EPEngine.install`)."""
