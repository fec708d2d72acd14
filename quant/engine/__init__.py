"""How a run executes: structure discovery (``structure``), the block loop (``loop``) and its stage driver
(``blockwise``), where weights come from (``streaming``: resident or read from disk), resume (``resume``),
torchrun data parallelism (``distributed``), the pass registry and context (``passes``) and recipes (``recipe``).
Knows no method: methods register passes into it."""
