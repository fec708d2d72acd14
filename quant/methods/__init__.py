"""The passes, one module each: RTN/GPTQ configs (``quantizers``), the GPTQ column loop (``gptq``), the one block
quantizer (``blockquant``), D²Quant (``d2quant``, ``dsq``), rotation, NSDS (``nsds``, ``allocation``),
FPTQuant (``fpt``). They run on the engine and produce runtime modules."""
