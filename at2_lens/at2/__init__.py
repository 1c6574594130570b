"""AT2, "Learning to Attribute with Attention" (Cohen-Wang, Chuang, Madry, 2025): the method only.

``attribution`` (the Captum class ``AT2Attribution``), ``estimator`` (the per-head weights and their file format),
``pretrained`` (estimators shipped with the package), ``collect`` (the resumable collection loop), ``store`` (its
on-disk examples) and ``training`` (the Pearson-correlation trainer). The engine it runs on (keep-masks, ablation
modes, target outputs, attention features) is :mod:`at2_lens.ablation`; what is attributed is :mod:`at2_lens.tasks`.
"""
