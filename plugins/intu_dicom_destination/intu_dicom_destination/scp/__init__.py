"""The `dicom` source, a C-STORE SCP: ``source`` (the type the engine sees), ``settings``,
``persist`` (received files made durable before the C-STORE is answered)."""
