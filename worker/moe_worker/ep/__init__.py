"""The expert-parallel data path of one rank: joining the group (`group`), dispatch and combine
(`dispatch`), the engine with its stacked expert slots (`engine`, `slots`, `transfer`), two-batch
overlap (`two_batch`), how a step runs (`runner`) and token choice (`sampling`)."""
