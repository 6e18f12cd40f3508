"""Offline: confusion-cell statistics and target-class rules from a research_crossfit/--save npz."""
import numpy as np, sys
d=np.load(sys.argv[1]); p=d['p']; mask=d['mask']; y=d['labels']; s=int(d['src']); t=int(d['tgt'])
k=p.shape[1]; n=len(y)
pl=p[np.arange(n),y]; win=p.argmax(1)
print("poison p(label) quantiles", np.quantile(pl[mask],[.1,.25,.5,.75,.9]).round(3))
print("clean-target p(label) q", np.quantile(pl[(~mask)&(y==t)],[.1,.25,.5,.75,.9]).round(3))
print("clean-all p(label) q", np.quantile(pl[~mask],[.1,.25,.5,.75,.9]).round(3))
print("poison p(src) q", np.quantile(p[mask,s],[.1,.25,.5,.75,.9]).round(3))
print("clean-target p(src) q", np.quantile(p[(~mask)&(y==t),s],[.1,.25,.5,.75,.9]).round(3))
# per pair mass and counts
M=np.zeros((k,k)); C=np.zeros((k,k)); CC=np.zeros((k,k))
for c in range(k):
    M[c]=p[y==c].sum(0); C[c]=np.bincount(win[y==c],minlength=k)
    conf=(y==c)&(p.max(1)>0.8); CC[c]=np.bincount(win[conf],minlength=k)
nc=np.bincount(y,minlength=k)
for name,A in (("mass",M),("count",C),("conf0.8",CC)):
    np.fill_diagonal(A,0)
    # conditional binomial vs transposed with quasi-symmetry u fitted by log ratio LS
    L=np.log((A+0.5)/(A.T+0.5)); W=1/(1/(A+0.5)+1/(A.T+0.5)); np.fill_diagonal(W,0)
    # solve u: minimize sum W (L - (u_i - u_j))^2
    Lap=np.diag(W.sum(1))-W
    b=(W*L).sum(1)
    u=np.linalg.lstsq(Lap+1e-9*np.eye(k),b,rcond=None)[0]
    R=(L-(u[:,None]-u[None,:]))*np.sqrt(W); np.fill_diagonal(R,-9)
    o=np.argsort(-R.ravel())[:5]
    print(name, "tgt,src:", round(A[t,s],1), round(A[s,t],1), "top resid:", [(i//k,i%k,round(R.ravel()[i],1),round(A.ravel()[i])) for i in o])
    # simple transposed
    m=A+A.T; z=(A-m/2)/np.sqrt(m/4+1); np.fill_diagonal(z,-9); o=np.argsort(-z.ravel())[:5]
    print("   plain z top:", [(i//k,i%k,round(z.ravel()[i],1)) for i in o])
# per-sample rule: within target class, p(label)<thr
for thr in (0.3,0.5,0.7):
    rm=(y==t)&(pl<thr); print("tgt-class p(label)<",thr,"recall",rm[mask].mean().round(3),"clean removed",rm[~mask].sum())
for thr in (0.5,0.8,0.9):
    rm=(p.max(1)>thr)&(win!=y); print("confident-wrong >",thr,"recall",rm[mask].mean().round(3),"clean removed frac",rm[~mask].mean().round(4))
