"""What goes to and comes from disk: our checkpoint (``checkpoint``, ``qconfig``), GPTQ/vLLM export and import
(``gptq_format``), the Hub (``hub``), transformers' ``quant_method`` integration (``hf_integration``), loading
any model (``models``), checked reads (``reader``, ``tensor_checks``) and atomic writes (``atomic``)."""
