"""Offline: AUC / recall at fixed clean-removal of held-out p(label) from a research_crossfit/--save npz."""
import numpy as np, sys
d=np.load(sys.argv[1]); p=d['p'] if len(sys.argv)<3 else d[sys.argv[2]]; mask=d['mask']; y=d['labels']; s=int(d['src']); t=int(d['tgt'])
n=len(y); k=p.shape[1]
pl=p[np.arange(n),y]; po=p.copy(); po[np.arange(n),y]=-1; other=po.max(1)
scores={"p(label)":pl,"margin":pl-other,"logratio":np.log(pl+1e-6)-np.log(other+1e-6)}
from sklearn.metrics import roc_auc_score
for name,sc in scores.items():
    auc=roc_auc_score(mask,-sc)
    row=[]
    for cl in (0.05,0.1,0.2):
        thr=np.quantile(sc[~mask],cl); row.append(f"clean{int(cl*100)}%->rec {(sc[mask]<=thr).mean():.2f}")
    # within target class only
    print(f"{name:9} AUC {auc:.3f} AUC-in-target {roc_auc_score(mask[y==t],-sc[y==t]):.3f}", " ".join(row))
