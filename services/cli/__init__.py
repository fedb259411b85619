"""The ``flowkv`` command: ``up``, ``gateway``, ``scheduler``, ``node``, ``status`` (and later ``bench``, ``sim``)."""
