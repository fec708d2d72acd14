"""What a quantized model runs with: packed linears (``quantlinear``, ``dsqlinear``), DAC's norm biases
(``dac``), online input ops and activation/KV quantization (``inputops``), and perplexity (``perplexity``,
resident or streamed)."""
