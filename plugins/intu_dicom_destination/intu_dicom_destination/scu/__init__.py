"""The `dicom` destination, a C-STORE SCU: ``destination`` (the type the engine sees),
``settings``, ``sender`` (pool + exchange with retry), ``pool`` (reusable associations),
``exchange`` (C-STORE/C-ECHO on one association), ``contexts``, ``transcode`` (lossless
transfer-syntax changes), ``statuses``, ``checks`` (a local file checked before `intu dicom send`)."""
